//! The dev-host profile (`miniapp-brokerd dev-host --profile FILE`): never panics; an accepted
//! profile survives being written back out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miniapp_brokerd::dev_host::DevHostConfig;

fuzz_target!(|text: &str| {
    if let Ok(profile) = DevHostConfig::from_toml(text) {
        let again = toml::to_string(&profile).expect("an accepted profile serializes");
        assert_eq!(DevHostConfig::from_toml(&again), Ok(profile));
    }
});
