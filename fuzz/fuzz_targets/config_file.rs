#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| weir_core::fuzzing::config_file(data));
