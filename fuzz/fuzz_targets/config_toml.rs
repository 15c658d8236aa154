//! The daemon's config file: never panics; an accepted config is valid and survives being
//! written back out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miniapp_brokerd::Config;

fuzz_target!(|text: &str| {
    if let Ok(config) = Config::from_toml(text) {
        assert!(config.validate().is_ok());
        let again = toml::to_string(&config).expect("an accepted config serializes");
        assert_eq!(Config::from_toml(&again), Ok(config));
    }
});
