//! SDS resource names: parse never panics, and errors quote only a short prefix.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svid_bridge::sds::names::{SpecialNames, parse};

fuzz_target!(|data: &[u8]| {
    let name = String::from_utf8_lossy(data);
    if let Err(err) = parse(&name, &SpecialNames::default()) {
        assert!(err.to_string().len() < 1024);
    }
});
