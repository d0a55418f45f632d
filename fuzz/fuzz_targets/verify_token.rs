//! Arbitrary bytes (as lossy UTF-8) verified as a token for `OWN` at `NOW`
//! by the engine trusting `PEER`: no panic, a reason from `Reason::ALL`, and
//! nothing accepted unless the trusted key signed it (`check_outcome`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokend_fuzz::{NOW, OWN, PEER, check_outcome, fixture};

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let token = String::from_utf8_lossy(data);
    // The default audience, and the peer's own (so aud checks both ways).
    for audience in [OWN, PEER] {
        let r = f.engine.verify_at(&token, audience, NOW);
        check_outcome(&token, audience, &r);
    }
});
