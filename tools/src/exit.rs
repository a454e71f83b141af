//! Exit codes a script can rely on. Every failure that is not a local one carries a
//! [`Failure`] somewhere in its anyhow chain; anything else exits 1.

use std::fmt;
use std::process::ExitCode;

use registrar::wire::ijam::Status;

/// Shown in `--help` and mirrored in `tools/README.md`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  usage or local error (bad arguments, unreadable or damaged state file)
  2  server unreachable, connection refused, or no reply in time
  3  credential refused: 401 invalid passphrase or unknown network (ijam),
     bad signature or nonce (pubkey attest)
  4  request refused: 400 bad request (or another 4xx)
  5  server busy or unavailable: 503, 429 (or another 5xx)
  6  state change refused: 403 transition not allowed, 404 unknown node
  7  reply failed verification (bad length, padding or checksum; not a frame,
     or not the reply to our request)
  8  device locked (pubkey): register got 403 (id bound to another key, or
     revoked) or 400 (key, id or signature refused); attest got 403 (revoked)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Local = 1,
    Unreachable = 2,
    Unauthorized = 3,
    BadRequest = 4,
    Busy = 5,
    StateRefused = 6,
    BadReply = 7,
    Locked = 8,
}

impl Kind {
    pub fn exit_code(self) -> ExitCode {
        ExitCode::from(self as u8)
    }
}

/// Which port a status came from: the same number means different things on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Register,
    State,
    /// pubkey Register on the envelope port.
    PubkeyRegister,
    /// pubkey Challenge and Attest on the envelope port.
    PubkeyAttest,
}

/// The exit class of a non-200 status.
pub fn kind_of_status(status: Status, port: Port) -> Kind {
    match (status, port) {
        (Status::UNAUTHORIZED, _) => Kind::Unauthorized,
        // The device firmware stops here: its identity is refused for good.
        (Status::FORBIDDEN | Status::BAD_REQUEST, Port::PubkeyRegister) => Kind::Locked,
        (Status::FORBIDDEN, Port::PubkeyAttest) => Kind::Locked,
        // The upstream registration server answers 404 "Network not found.".
        (Status::NOT_FOUND, Port::Register) => Kind::Unauthorized,
        (Status::FORBIDDEN | Status::NOT_FOUND, Port::State) => Kind::StateRefused,
        (Status::TOO_MANY_REQUESTS | Status::SERVICE_UNAVAILABLE, _) => Kind::Busy,
        (Status(400..=499), _) => Kind::BadRequest,
        (Status(500..=599), _) => Kind::Busy,
        _ => Kind::BadReply,
    }
}

/// A classified failure: its kind picks the exit code; `status` is the server's, if
/// one answered.
#[derive(Debug)]
pub struct Failure {
    pub kind: Kind,
    pub status: Option<Status>,
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

pub fn fail(kind: Kind, message: impl Into<String>) -> anyhow::Error {
    Failure {
        kind,
        status: None,
        message: message.into(),
    }
    .into()
}

pub fn refused(status: Status, port: Port, message: impl Into<String>) -> anyhow::Error {
    Failure {
        kind: kind_of_status(status, port),
        status: Some(status),
        message: message.into(),
    }
    .into()
}

/// The kind and server status of an error: the first [`Failure`] in its chain.
pub fn classify(e: &anyhow::Error) -> (Kind, Option<Status>) {
    e.chain()
        .find_map(|c| c.downcast_ref::<Failure>())
        .map_or((Kind::Local, None), |f| (f.kind, f.status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_documented_codes() {
        let reg = |s| kind_of_status(Status(s), Port::Register) as u8;
        let state = |s| kind_of_status(Status(s), Port::State) as u8;
        assert_eq!(reg(401), 3);
        assert_eq!(reg(404), 3);
        assert_eq!(reg(400), 4);
        assert_eq!(reg(503), 5);
        assert_eq!(reg(429), 5);
        assert_eq!(reg(500), 5);
        assert_eq!(state(403), 6);
        assert_eq!(state(404), 6);
        assert_eq!(state(400), 4);
        assert_eq!(state(401), 3);
        assert_eq!(reg(302), 7);
        let pk_reg = |s| kind_of_status(Status(s), Port::PubkeyRegister) as u8;
        let pk_att = |s| kind_of_status(Status(s), Port::PubkeyAttest) as u8;
        assert_eq!(
            (pk_reg(403), pk_reg(400), pk_reg(429), pk_reg(503)),
            (8, 8, 5, 5)
        );
        assert_eq!(
            (
                pk_att(403),
                pk_att(401),
                pk_att(404),
                pk_att(409),
                pk_att(410)
            ),
            (8, 3, 4, 4, 4)
        );
        assert_eq!(pk_att(400), 4);
    }

    #[test]
    fn classify_finds_a_failure_under_context() {
        let e = fail(Kind::Unreachable, "down").context("while registering");
        assert_eq!(classify(&e), (Kind::Unreachable, None));
        assert_eq!(classify(&anyhow::anyhow!("plain")), (Kind::Local, None));
    }
}
