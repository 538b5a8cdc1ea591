// The redact_digits example plugin in AssemblyScript: digits inside JSON strings become
// '#'. Same ABI (docs/plugin_sdk.md) and output as ../redact_digits.wat.
//
//   npm install && npm run build    # -> build/redact_digits.wasm

// alloc(size) -> ptr: a block the host writes into (and reads the output from).
export function alloc(size: i32): i32 {
  return <i32>heap.alloc(<usize>size);
}

// dealloc(ptr, size): the host is done with a block.
export function dealloc(ptr: i32, size: i32): void {
  heap.free(<usize>ptr);
}

// process(ptr, len) -> (out_ptr << 32 | out_len): a JSON array of records in, a JSON
// array of as many results out. Masking keeps the length, so out_len == len.
export function process(ptr: i32, len: i32): i64 {
  const out = <i32>heap.alloc(<usize>len);
  let inString = false;
  let escaped = false;
  for (let i = 0; i < len; i++) {
    let c = load<u8>(<usize>(ptr + i));
    if (escaped) {
      escaped = false; // the byte after a backslash stays
    } else if (inString && c == 0x5c) {
      escaped = true;
    } else if (c == 0x22) {
      inString = !inString;
    } else if (inString && c >= 0x30 && c <= 0x39) {
      c = 0x23;
    }
    store<u8>(<usize>(out + i), c);
  }
  return (<i64><u32>out << 32) | <i64><u32>len;
}
