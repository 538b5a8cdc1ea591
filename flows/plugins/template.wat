;; DataFlare WASM plugin template (WebAssembly text). Copy it, then change `process`.
;; The ABI is described in docs/plugin_sdk.md. This template returns every record
;; unchanged: the output JSON array is a copy of the input one.
;;
;; Try it:  dataflare plugin test flows/plugins/template.wat --input records.jsonl
(module
  ;; The host writes the input into this memory and reads the output from it.
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))

  ;; alloc(size) -> ptr: room for `size` bytes (a bump allocator that grows the memory).
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

  ;; dealloc(ptr, size): the host is done with a block (the newest block is popped).
  (func (export "dealloc") (param $ptr i32) (param $size i32)
    (if (i32.eq (i32.add (local.get $ptr) (local.get $size)) (global.get $heap))
      (then (global.set $heap (local.get $ptr)))))

  ;; configure(ptr, len) -> 0: the step's settings as a JSON object; non-zero refuses them.
  (func (export "configure") (param $ptr i32) (param $len i32) (result i32)
    (i32.const 0))

  ;; process(ptr, len) -> (out_ptr << 32 | out_len): a JSON array of records in, a JSON
  ;; array of the same length out (a record, null to drop it, {"$error": "..."} to fail it).
  (func (export "process") (param $ptr i32) (param $len i32) (result i64)
    (local $out i32)
    (local.set $out (call $alloc (local.get $len)))
    (memory.copy (local.get $out) (local.get $ptr) (local.get $len))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
            (i64.extend_i32_u (local.get $len))))
)
