;; Worked example of a DataFlare WASM plugin: mask every digit inside JSON strings with
;; '#' (card numbers, phone numbers in free text), leaving numbers, keys' structure and
;; escapes alone. Built from this source in the tests; the ABI is in docs/plugin_sdk.md.
;;
;; Build:  .venv/bin/python -c "import wasmtime,sys; open(sys.argv[2],'wb').write(
;;            wasmtime.wat2wasm(open(sys.argv[1]).read()))" redact_digits.wat redact_digits.wasm
;; Test:   dataflare plugin test flows/plugins/redact_digits.wat --input records.jsonl
;;
;; Digits in string *keys* are masked too: name fields without digits.
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))

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

  ;; The output has the input's length: copy byte by byte, masking digits in strings.
  (func (export "process") (param $ptr i32) (param $len i32) (result i64)
    (local $out i32) (local $i i32) (local $c i32) (local $in_str i32) (local $esc i32)
    (local.set $out (call $alloc (local.get $len)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (local.set $c (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))
        (if (local.get $esc)
          (then (local.set $esc (i32.const 0)))         ;; the byte after '\' stays
          (else
            (if (i32.and (local.get $in_str) (i32.eq (local.get $c) (i32.const 92)))  ;; '\'
              (then (local.set $esc (i32.const 1)))
              (else
                (if (i32.eq (local.get $c) (i32.const 34))                           ;; '"'
                  (then (local.set $in_str (i32.xor (local.get $in_str) (i32.const 1))))
                  (else
                    (if (i32.and (local.get $in_str)
                                 (i32.and (i32.ge_u (local.get $c) (i32.const 48))   ;; '0'
                                          (i32.le_u (local.get $c) (i32.const 57)))) ;; '9'
                      (then (local.set $c (i32.const 35))))))))))                    ;; '#'
        (i32.store8 (i32.add (local.get $out) (local.get $i)) (local.get $c))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
            (i64.extend_i32_u (local.get $len))))
)
