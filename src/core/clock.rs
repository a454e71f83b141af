//! Wall-clock time as the store and the wire carry it: milliseconds since the Unix
//! epoch. Only the edges read the clock (the server per request, the admin commands
//! per command); flows and stores take `now_ms` as an argument.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 on a clock set before it.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
