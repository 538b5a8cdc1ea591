;; A DataFlare WASM plugin for the tests, written in WebAssembly text.
;;
;; process(ptr, len) receives a JSON array of records and returns (ptr << 32 | len) of a
;; JSON array of the same length. This one upper-cases the letters inside JSON strings
;; (keys and values), leaving escapes, numbers and literals alone. For the tests, a '!'
;; anywhere in the input traps, and a '~' loops forever (the host's timeout stops it).
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (global $configured (mut i32) (i32.const 0))

  ;; bump allocator; dealloc of the newest block pops it
  (func $alloc (export "alloc") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (block $ok
      (loop $grow
        (br_if $ok (i32.le_u (global.get $heap)
                             (i32.mul (memory.size) (i32.const 65536))))
        (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))
        (br $grow)))
    (local.get $ptr))

  (func (export "dealloc") (param $ptr i32) (param $size i32)
    (if (i32.eq (i32.add (local.get $ptr) (local.get $size)) (global.get $heap))
      (then (global.set $heap (local.get $ptr)))))

  ;; configure(ptr, len) -> 0 when the configuration is accepted (any JSON object here)
  (func (export "configure") (param $ptr i32) (param $len i32) (result i32)
    (global.set $configured (i32.const 1))
    (if (result i32) (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 123))  ;; '{'
      (then (i32.const 0)) (else (i32.const 2))))

  (func (export "process") (param $ptr i32) (param $len i32) (result i64)
    (local $out i32) (local $i i32) (local $c i32) (local $in_str i32) (local $esc i32)
    (if (i32.eqz (global.get $configured)) (then unreachable))
    (local.set $out (call $alloc (local.get $len)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (local.set $c (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))
        (if (i32.eq (local.get $c) (i32.const 33)) (then unreachable))          ;; '!'
        (if (i32.eq (local.get $c) (i32.const 126)) (then (loop $forever (br $forever))))
        (if (local.get $esc)
          (then (local.set $esc (i32.const 0)))
          (else
            (if (i32.and (local.get $in_str) (i32.eq (local.get $c) (i32.const 92)))  ;; '\'
              (then (local.set $esc (i32.const 1)))
              (else
                (if (i32.eq (local.get $c) (i32.const 34))                           ;; '"'
                  (then (local.set $in_str (i32.xor (local.get $in_str) (i32.const 1))))
                  (else
                    (if (i32.and (local.get $in_str)
                                 (i32.and (i32.ge_u (local.get $c) (i32.const 97))
                                          (i32.le_u (local.get $c) (i32.const 122))))
                      (then (local.set $c (i32.sub (local.get $c) (i32.const 32)))))))))))
        (i32.store8 (i32.add (local.get $out) (local.get $i)) (local.get $c))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
            (i64.extend_i32_u (local.get $len))))
)
