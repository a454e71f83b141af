//! The JAMScript-OTA `ijam` frames (schemas/ijam.md; docs/design.md "The ijam wire, in brief"), byte-compatible
//! with the upstream Node.js listener and its C client `ijamreg`.
//!
//! ```text
//! certificate request (8444/tcp)   3f 4d 12 8c            u32 LE 0x8c124d3f
//! registration request (8445)      RSA-OAEP-SHA1( RegisterRequest, 88 bytes )
//!   0        16          32           48          80      84      88
//!   | node_id | network_id | passphrase | node_key  | type  | arch  |
//! registration reply               status u16 LE ‖ IV (16) ‖ AES-256-CBC(node_key, IV,
//!                                   node_id ‖ xor(node_id) ‖ 15 × 0x0f)   = 50 bytes
//! error reply                      status u16 LE ‖ ASCII reason (no NUL, no length)
//! state request (8446)             node_id (16) ‖ IV (16) ‖ AES-256-CBC(node_key, IV,
//!                                   status u32 LE ‖ xor(status) ‖ 11 × 0x0b)   = 48 bytes
//! state reply                      status u16 LE                               = 2 bytes
//! ```
//!
//! Two levels, as smoltcp's `Packet`/`Repr`: the `Raw*` zerocopy structs accept any
//! bytes; the checked messages (`RegisterRequest`, `StateCode`) validate every field
//! once. AES and RSA live in `crate::core::crypto`: this module only lays out plaintexts.

use std::fmt;

use uuid::Uuid;
use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::DecodeError;
pub use crate::core::ids::NodeKey;

/// The certificate request: the magic 0x8c124d3f as u32 little-endian.
pub const CERT_MAGIC: u32 = 0x8c12_4d3f;
pub const CERT_REQUEST: [u8; 4] = CERT_MAGIC.to_le_bytes();
/// The C client reads exactly 800 bytes of PEM; shorter keys are NUL-padded up to this.
pub const CERT_REPLY_MIN_LEN: usize = 800;

pub const REGISTER_REQUEST_LEN: usize = 88;
pub const REGISTER_REPLY_LEN: usize = 50;
pub const STATE_REQUEST_LEN: usize = 48;
pub const STATE_REPLY_LEN: usize = 2;
const AES_BLOCK: usize = 16;

/// Status codes carried as u16 LE at the start of every reply. An open newtype: unknown
/// values from a peer stay representable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u16);

impl Status {
    pub const OK: Status = Status(200);
    pub const BAD_REQUEST: Status = Status(400);
    pub const UNAUTHORIZED: Status = Status(401);
    pub const FORBIDDEN: Status = Status(403);
    pub const NOT_FOUND: Status = Status(404);
    pub const TOO_MANY_REQUESTS: Status = Status(429);
    pub const SERVICE_UNAVAILABLE: Status = Status(503);
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The registration plaintext as laid out on the wire; accepts any 88 bytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRegisterRequest {
    pub node_id: [u8; 16],
    pub network_id: [u8; 16],
    pub passphrase: [u8; 16],
    pub node_key: [u8; 32],
    pub node_type: U32,
    pub node_arch: U32,
}
const _: () = assert!(size_of::<RawRegisterRequest>() == REGISTER_REQUEST_LEN);

/// The 200 registration reply; any other status is an [`error_reply`].
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRegisterReply {
    pub status: U16,
    pub iv: [u8; 16],
    pub body: [u8; 32],
}
const _: () = assert!(size_of::<RawRegisterReply>() == REGISTER_REPLY_LEN);

/// The state request: the node id in clear (the key to decrypt with), then IV and
/// one AES block.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawStateRequest {
    pub node_id: [u8; 16],
    pub iv: [u8; 16],
    pub body: [u8; 16],
}
const _: () = assert!(size_of::<RawStateRequest>() == STATE_REQUEST_LEN);

/// A state request, split: the node id names the key the rest decrypts under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateRequest {
    pub node_id: Uuid,
    pub iv: [u8; 16],
    /// One AES block: the status code, its checksum and padding, encrypted.
    pub body: [u8; 16],
}

impl StateRequest {
    /// Exactly 48 bytes.
    pub fn parse(frame: &[u8]) -> Result<Self, DecodeError> {
        let raw = RawStateRequest::ref_from_bytes(frame).map_err(|_| DecodeError::Length {
            expected: STATE_REQUEST_LEN,
            got: frame.len(),
        })?;
        Ok(StateRequest {
            node_id: Uuid::from_bytes(raw.node_id),
            iv: raw.iv,
            body: raw.body,
        })
    }

    pub fn to_bytes(&self) -> [u8; STATE_REQUEST_LEN] {
        let raw = RawStateRequest {
            node_id: self.node_id.into_bytes(),
            iv: self.iv,
            body: self.body,
        };
        let mut out = [0u8; STATE_REQUEST_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }
}

/// A network passphrase: 1–16 ASCII alphanumerics. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Passphrase(String);

impl Passphrase {
    pub const MAX_LEN: usize = 16;

    /// Checks a typed or generated passphrase (the admin side of the same rule the
    /// decoder applies to the NUL-padded field).
    pub fn new(s: &str) -> Result<Self, DecodeError> {
        let field = "passphrase";
        if s.is_empty() {
            return Err(DecodeError::Empty { field });
        }
        if s.len() > Self::MAX_LEN {
            return Err(DecodeError::Length {
                expected: Self::MAX_LEN,
                got: s.len(),
            });
        }
        if let Some(offset) = s.bytes().position(|b| !b.is_ascii_alphanumeric()) {
            return Err(DecodeError::BadByte { field, offset });
        }
        Ok(Passphrase(s.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

/// A network id: 1–16 printable ASCII characters (no space), NUL-padded on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetworkId(String);

impl NetworkId {
    pub const MAX_LEN: usize = 16;

    pub fn new(s: &str) -> Result<Self, DecodeError> {
        let field = "network_id";
        if s.is_empty() {
            return Err(DecodeError::Empty { field });
        }
        if s.len() > Self::MAX_LEN {
            return Err(DecodeError::Length {
                expected: Self::MAX_LEN,
                got: s.len(),
            });
        }
        if let Some(offset) = s.bytes().position(|b| !b.is_ascii_graphic()) {
            return Err(DecodeError::BadByte { field, offset });
        }
        Ok(NetworkId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NetworkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Node type, one-hot on the wire (docs/design.md: 2 device, 4 fog, 8 cloud).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeType {
    Device = 2,
    Fog = 4,
    Cloud = 8,
}

impl NodeType {
    pub const ALL: [NodeType; 3] = [NodeType::Device, NodeType::Fog, NodeType::Cloud];

    pub fn from_code(code: u32) -> Result<Self, DecodeError> {
        Self::ALL
            .into_iter()
            .find(|t| *t as u32 == code)
            .ok_or(DecodeError::NotOneHot {
                field: "node_type",
                value: code,
            })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NodeType::Device => "device",
            NodeType::Fog => "fog",
            NodeType::Cloud => "cloud",
        }
    }
}

/// Node architecture, one-hot on the wire. The original also took 0 and 1 (its check
/// tested the node type by mistake) and stored them as `none`: so do we
/// (schemas/ijam.md, "Choices").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeArch {
    /// Code 0: no bit set.
    Unset = 0,
    /// Code 1: the original's `NONE` bit.
    None = 1,
    X86Ubuntu = 2,
    RpiLinux = 4,
    Wsl = 8,
    Macos = 16,
    Esp32 = 32,
}

impl NodeArch {
    /// The architectures a node can name.
    pub const ALL: [NodeArch; 5] = [
        NodeArch::X86Ubuntu,
        NodeArch::RpiLinux,
        NodeArch::Wsl,
        NodeArch::Macos,
        NodeArch::Esp32,
    ];
    /// Every code a request may carry.
    pub const ACCEPTED: [NodeArch; 7] = [
        NodeArch::Unset,
        NodeArch::None,
        NodeArch::X86Ubuntu,
        NodeArch::RpiLinux,
        NodeArch::Wsl,
        NodeArch::Macos,
        NodeArch::Esp32,
    ];

    pub fn from_code(code: u32) -> Result<Self, DecodeError> {
        Self::ACCEPTED
            .into_iter()
            .find(|a| *a as u32 == code)
            .ok_or(DecodeError::NotOneHot {
                field: "node_arch",
                value: code,
            })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NodeArch::Unset | NodeArch::None => "none",
            NodeArch::X86Ubuntu => "x86_ubuntu",
            NodeArch::RpiLinux => "rpi_linux",
            NodeArch::Wsl => "wsl",
            NodeArch::Macos => "macos",
            NodeArch::Esp32 => "esp32",
        }
    }
}

/// A checked registration request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterRequest {
    /// `None` when the client sent all zeros: the server assigns one.
    pub node_id: Option<Uuid>,
    pub network_id: NetworkId,
    pub passphrase: Passphrase,
    pub node_key: NodeKey,
    pub node_type: NodeType,
    pub node_arch: NodeArch,
}

impl TryFrom<&RawRegisterRequest> for RegisterRequest {
    type Error = DecodeError;

    fn try_from(raw: &RawRegisterRequest) -> Result<Self, DecodeError> {
        let node_id = Some(Uuid::from_bytes(raw.node_id)).filter(|id| !id.is_nil());
        let network_id = NetworkId::new(c_string("network_id", &raw.network_id)?)?;
        let passphrase = Passphrase::new(c_string("passphrase", &raw.passphrase)?)?;
        Ok(RegisterRequest {
            node_id,
            network_id,
            passphrase,
            node_key: NodeKey(raw.node_key),
            node_type: NodeType::from_code(raw.node_type.get())?,
            node_arch: NodeArch::from_code(raw.node_arch.get())?,
        })
    }
}

impl RegisterRequest {
    /// Parses a decrypted registration plaintext (exactly 88 bytes).
    pub fn parse(plaintext: &[u8]) -> Result<Self, DecodeError> {
        let raw =
            RawRegisterRequest::ref_from_bytes(plaintext).map_err(|_| DecodeError::Length {
                expected: REGISTER_REQUEST_LEN,
                got: plaintext.len(),
            })?;
        RegisterRequest::try_from(raw)
    }

    /// The 88-byte plaintext a client encrypts.
    pub fn to_bytes(&self) -> [u8; REGISTER_REQUEST_LEN] {
        let raw = RawRegisterRequest {
            node_id: self.node_id.map_or([0; 16], |id| id.into_bytes()),
            network_id: nul_pad(self.network_id.as_str()),
            passphrase: nul_pad(self.passphrase.expose()),
            node_key: self.node_key.0,
            node_type: U32::new(self.node_type as u32),
            node_arch: U32::new(self.node_arch as u32),
        };
        let mut out = [0u8; REGISTER_REQUEST_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }
}

/// Reads a string field as the C client writes it and the original read it: the text
/// up to the first NUL (or the whole field), whatever follows. `fgets` from a console
/// with CRLF line ends leaves `\0\n` and stale bytes after the text.
fn c_string<'a>(field: &'static str, bytes: &'a [u8]) -> Result<&'a str, DecodeError> {
    let text = &bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())];
    if let Some(offset) = text.iter().position(|b| !b.is_ascii()) {
        return Err(DecodeError::BadByte { field, offset });
    }
    // ASCII was checked just above, so this cannot fail.
    std::str::from_utf8(text).map_err(|_| DecodeError::BadByte { field, offset: 0 })
}

fn nul_pad<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    out[..s.len()].copy_from_slice(s.as_bytes());
    out
}

fn xor_all(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |acc, b| acc ^ b)
}

/// Lays out `data ‖ xor(data) ‖ PKCS#7 padding`, the plaintext of every AES-CBC
/// message of the protocol. `N` must be the padded length.
pub fn checksummed_plaintext<const N: usize>(data: &[u8]) -> [u8; N] {
    // One padding block at most, and at least one padding byte (PKCS#7).
    assert!(N.is_multiple_of(AES_BLOCK) && data.len() + 1 < N && N - data.len() - 1 <= AES_BLOCK);
    let pad = (N - data.len() - 1) as u8;
    let mut out = [pad; N];
    out[..data.len()].copy_from_slice(data);
    out[data.len()] = xor_all(data);
    out
}

/// Checks PKCS#7 padding and the XOR checksum; returns the data bytes.
pub fn open_checksummed(plain: &[u8]) -> Result<&[u8], DecodeError> {
    let &pad = plain.last().ok_or(DecodeError::Length {
        expected: AES_BLOCK,
        got: 0,
    })?;
    let pad_len = pad as usize;
    if pad_len == 0 || pad_len > AES_BLOCK || pad_len + 1 > plain.len() {
        return Err(DecodeError::Padding(pad));
    }
    let body_len = plain.len() - pad_len;
    if plain[body_len..].iter().any(|&b| b != pad) {
        return Err(DecodeError::Padding(pad));
    }
    let (data, checksum) = plain[..body_len].split_at(body_len - 1);
    let expected = xor_all(data);
    if checksum[0] != expected {
        return Err(DecodeError::Checksum {
            expected,
            got: checksum[0],
        });
    }
    Ok(data)
}

/// The 32-byte plaintext of a 200 registration reply.
pub fn register_reply_plaintext(node_id: Uuid) -> [u8; 32] {
    checksummed_plaintext(node_id.as_bytes())
}

/// The node id inside a decrypted 200 reply body.
pub fn parse_register_reply_plaintext(plain: &[u8]) -> Result<Uuid, DecodeError> {
    if plain.len() != 32 {
        return Err(DecodeError::Length {
            expected: 32,
            got: plain.len(),
        });
    }
    let data = open_checksummed(plain)?;
    let id: [u8; 16] = data.try_into().map_err(|_| DecodeError::Length {
        expected: 16,
        got: data.len(),
    })?;
    Ok(Uuid::from_bytes(id))
}

/// Builds the 50-byte 200 reply from an already encrypted body.
pub fn register_reply(iv: [u8; 16], body: [u8; 32]) -> [u8; REGISTER_REPLY_LEN] {
    let raw = RawRegisterReply {
        status: U16::new(Status::OK.0),
        iv,
        body,
    };
    let mut out = [0u8; REGISTER_REPLY_LEN];
    out.copy_from_slice(raw.as_bytes());
    out
}

/// The reason texts of error replies (schemas/ijam.md, "Error replies"): one per class,
/// so a reply tells a peer nothing beyond its class.
pub const REASON_REQUEST: &str = "request";
pub const REASON_INVALID_PASSPHRASE: &str = "Invalid passphrase.";
pub const REASON_NODE_NOT_FOUND: &str = "Node not found.";
pub const REASON_UNAVAILABLE: &str = "Service unavailable.";
pub const REASON_BUSY: &str = "Server busy.";
pub const REASON_RATE_LIMITED: &str = "Too many requests.";

/// `status u16 LE ‖ reason`: the upstream error reply (no NUL, no length prefix).
pub fn error_reply(status: Status, reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + reason.len());
    out.extend_from_slice(&status.0.to_le_bytes());
    out.extend_from_slice(reason.as_bytes());
    out
}

/// Splits any reply into its status and the rest.
pub fn parse_reply_status(reply: &[u8]) -> Result<(Status, &[u8]), DecodeError> {
    match reply {
        [lo, hi, rest @ ..] => Ok((Status(u16::from_le_bytes([*lo, *hi])), rest)),
        _ => Err(DecodeError::Length {
            expected: 2,
            got: reply.len(),
        }),
    }
}

pub fn state_reply(status: Status) -> [u8; STATE_REPLY_LEN] {
    status.0.to_le_bytes()
}

/// Node status as coded in a state request (one-hot: 4 offline, 8 loading, 16 online).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateCode {
    Offline = 4,
    Loading = 8,
    Online = 16,
}

impl StateCode {
    pub const ALL: [StateCode; 3] = [StateCode::Offline, StateCode::Loading, StateCode::Online];

    pub fn from_code(code: u32) -> Result<Self, DecodeError> {
        Self::ALL
            .into_iter()
            .find(|s| *s as u32 == code)
            .ok_or(DecodeError::NotOneHot {
                field: "node_status",
                value: code,
            })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StateCode::Offline => "offline",
            StateCode::Loading => "loading",
            StateCode::Online => "online",
        }
    }

    /// The decrypted state block: u32 LE status ‖ xor ‖ 11 × 0x0b.
    pub fn parse_plaintext(block: &[u8]) -> Result<Self, DecodeError> {
        if block.len() != AES_BLOCK {
            return Err(DecodeError::Length {
                expected: AES_BLOCK,
                got: block.len(),
            });
        }
        let data = open_checksummed(block)?;
        let code: [u8; 4] = data.try_into().map_err(|_| DecodeError::Length {
            expected: 4,
            got: data.len(),
        })?;
        StateCode::from_code(u32::from_le_bytes(code))
    }

    pub fn plaintext(self) -> [u8; AES_BLOCK] {
        checksummed_plaintext(&(self as u32).to_le_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RegisterRequest {
        RegisterRequest {
            node_id: None,
            network_id: NetworkId::new("testnet01").unwrap(),
            passphrase: Passphrase::new("alpha1").unwrap(),
            node_key: NodeKey([7; 32]),
            node_type: NodeType::Device,
            node_arch: NodeArch::Wsl,
        }
    }

    #[test]
    fn request_round_trips_and_lays_out_fields_at_their_offsets() {
        let req = sample();
        let bytes = req.to_bytes();
        assert_eq!(&bytes[0..16], &[0; 16]);
        assert_eq!(&bytes[16..25], b"testnet01");
        assert_eq!(&bytes[25..32], &[0; 7]);
        assert_eq!(&bytes[32..38], b"alpha1");
        assert_eq!(&bytes[48..80], &[7; 32]);
        assert_eq!(&bytes[80..84], &[2, 0, 0, 0]);
        assert_eq!(&bytes[84..88], &[8, 0, 0, 0]);
        assert_eq!(RegisterRequest::parse(&bytes).unwrap(), req);
    }

    #[test]
    fn truncated_and_oversized_plaintexts_are_length_errors() {
        let bytes = sample().to_bytes();
        for len in [0, 1, 87] {
            assert_eq!(
                RegisterRequest::parse(&bytes[..len]),
                Err(DecodeError::Length {
                    expected: 88,
                    got: len
                })
            );
        }
        let mut long = bytes.to_vec();
        long.push(0);
        assert_eq!(
            RegisterRequest::parse(&long),
            Err(DecodeError::Length {
                expected: 88,
                got: 89
            })
        );
    }

    #[test]
    fn bad_fields_are_typed_errors() {
        let good = sample().to_bytes();
        let with = |offset: usize, bytes: &[u8]| {
            let mut b = good;
            b[offset..offset + bytes.len()].copy_from_slice(bytes);
            RegisterRequest::parse(&b)
        };
        assert_eq!(
            with(80, &1u32.to_le_bytes()),
            Err(DecodeError::NotOneHot {
                field: "node_type",
                value: 1
            })
        );
        assert_eq!(
            with(80, &6u32.to_le_bytes()),
            Err(DecodeError::NotOneHot {
                field: "node_type",
                value: 6
            })
        );
        assert_eq!(
            with(84, &64u32.to_le_bytes()),
            Err(DecodeError::NotOneHot {
                field: "node_arch",
                value: 64
            })
        );
        assert_eq!(
            with(34, b"-"),
            Err(DecodeError::BadByte {
                field: "passphrase",
                offset: 2
            })
        );
        assert_eq!(
            with(32, &[0; 16]),
            Err(DecodeError::Empty {
                field: "passphrase"
            })
        );
        // Text before the first NUL is the field; what follows it is not read.
        assert_eq!(
            with(32, &[0x00, b'x']),
            Err(DecodeError::Empty {
                field: "passphrase"
            })
        );
        assert_eq!(
            with(16, &[0xff]),
            Err(DecodeError::BadByte {
                field: "network_id",
                offset: 0
            })
        );
        assert_eq!(
            with(16, b" "),
            Err(DecodeError::BadByte {
                field: "network_id",
                offset: 0
            })
        );
    }

    #[test]
    fn string_fields_are_c_strings_as_the_c_client_sends_them() {
        // CRLF line ends through fgets: "lab\0\n" and stale bytes after the NUL.
        let mut bytes = sample().to_bytes();
        bytes[16..32].copy_from_slice(b"lab\0\nstale\0\0\0\0\0\0");
        bytes[32..48].copy_from_slice(b"alpha1\0\n\r\x01\xff\0\0\0\0\0");
        let req = RegisterRequest::parse(&bytes).unwrap();
        assert_eq!(req.network_id.as_str(), "lab");
        assert_eq!(req.passphrase.expose(), "alpha1");
        // A field with no NUL at all is all text (16 characters).
        bytes[16..32].copy_from_slice(b"sixteen-chars-id");
        assert_eq!(
            RegisterRequest::parse(&bytes).unwrap().network_id.as_str(),
            "sixteen-chars-id"
        );
        // Rebuilt, the request is canonical: the text, then NULs.
        let canonical = RegisterRequest::parse(&bytes).unwrap().to_bytes();
        assert_eq!(&canonical[32..48], b"alpha1\0\0\0\0\0\0\0\0\0\0");
    }

    #[test]
    fn arch_codes_0_and_1_are_the_originals_none() {
        let with_arch = |code: u32| {
            let mut b = sample().to_bytes();
            b[84..88].copy_from_slice(&code.to_le_bytes());
            RegisterRequest::parse(&b)
                .map(|r| (r.node_arch, r.node_arch.as_str(), r.to_bytes() == b))
        };
        assert_eq!(with_arch(0), Ok((NodeArch::Unset, "none", true)));
        assert_eq!(with_arch(1), Ok((NodeArch::None, "none", true)));
        assert!(with_arch(3).is_err(), "two bits");
        assert!(with_arch(64).is_err());
    }

    #[test]
    fn what_parses_from_pseudo_random_plaintexts_rebuilds_to_itself() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in [0usize, 16, 87, 88, 89, 512] {
            for _ in 0..2000 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                if let Ok(request) = RegisterRequest::parse(&bytes) {
                    // Rebuilt canonically (NUL-padded fields), it parses to itself.
                    assert_eq!(RegisterRequest::parse(&request.to_bytes()), Ok(request));
                }
                if let Ok(code) = StateCode::parse_plaintext(&bytes) {
                    assert_eq!(code.plaintext().as_slice(), bytes.as_slice());
                }
                if let Ok(id) = parse_register_reply_plaintext(&bytes) {
                    assert_eq!(register_reply_plaintext(id).as_slice(), bytes.as_slice());
                }
                if let Ok((status, rest)) = parse_reply_status(&bytes) {
                    assert_eq!(error_reply(status, ""), bytes[..2]);
                    assert_eq!(rest, &bytes[2..]);
                }
            }
        }
    }

    #[test]
    fn reply_plaintext_matches_the_upstream_capture() {
        for (id, captured) in [
            (
                &include_bytes!("../../tests/vectors/ijam/reg4096_node_id.bin")[..],
                &include_bytes!("../../tests/vectors/ijam/reg4096_response_aes_plain.bin")[..],
            ),
            (
                include_bytes!("../../tests/vectors/ijam/reg2048_node_id.bin"),
                include_bytes!("../../tests/vectors/ijam/reg2048_response_aes_plain.bin"),
            ),
        ] {
            let id = Uuid::from_slice(id).unwrap();
            assert_eq!(register_reply_plaintext(id).as_slice(), captured);
            assert_eq!(parse_register_reply_plaintext(captured), Ok(id));
        }
    }

    #[test]
    fn state_plaintext_round_trips_and_rejects_bad_checksum_and_padding() {
        for code in StateCode::ALL {
            let block = code.plaintext();
            assert_eq!(&block[5..], &[0x0b; 11]);
            assert_eq!(StateCode::parse_plaintext(&block), Ok(code));
        }
        let mut bad = StateCode::Online.plaintext();
        bad[4] ^= 1;
        assert!(matches!(
            StateCode::parse_plaintext(&bad),
            Err(DecodeError::Checksum { .. })
        ));
        let mut bad = StateCode::Online.plaintext();
        bad[10] = 0;
        assert_eq!(
            StateCode::parse_plaintext(&bad),
            Err(DecodeError::Padding(0x0b))
        );
        let mut bad = StateCode::Online.plaintext();
        bad[15] = 0;
        assert_eq!(
            StateCode::parse_plaintext(&bad),
            Err(DecodeError::Padding(0))
        );
        bad[15] = 17;
        assert_eq!(
            StateCode::parse_plaintext(&bad),
            Err(DecodeError::Padding(17))
        );
        let seven = checksummed_plaintext::<16>(&7u32.to_le_bytes());
        assert_eq!(
            StateCode::parse_plaintext(&seven),
            Err(DecodeError::NotOneHot {
                field: "node_status",
                value: 7
            })
        );
    }

    #[test]
    fn replies_are_laid_out_as_upstream() {
        assert_eq!(
            error_reply(Status::BAD_REQUEST, "request"),
            b"\x90\x01request"
        );
        assert_eq!(state_reply(Status::OK), [0xc8, 0x00]);
        let reply = register_reply([0xa5; 16], [0x5a; 32]);
        assert_eq!(&reply[..2], &[0xc8, 0x00]);
        assert_eq!(&reply[2..18], &[0xa5; 16]);
        assert_eq!(&reply[18..], &[0x5a; 32]);
        assert_eq!(CERT_REQUEST, [0x3f, 0x4d, 0x12, 0x8c]);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn network() -> impl Strategy<Value = NetworkId> {
        "[!-~]{1,16}".prop_map(|s| NetworkId::new(&s).unwrap())
    }

    fn passphrase() -> impl Strategy<Value = Passphrase> {
        "[0-9A-Za-z]{1,16}".prop_map(|s| Passphrase::new(&s).unwrap())
    }

    fn request() -> impl Strategy<Value = RegisterRequest> {
        (
            any::<[u8; 16]>(),
            network(),
            passphrase(),
            any::<[u8; 32]>(),
            prop::sample::select(NodeType::ALL.to_vec()),
            prop::sample::select(NodeArch::ALL.to_vec()),
        )
            .prop_map(|(id, network_id, passphrase, key, node_type, node_arch)| {
                RegisterRequest {
                    node_id: Some(Uuid::from_bytes(id)).filter(|u| !u.is_nil()),
                    network_id,
                    passphrase,
                    node_key: NodeKey(key),
                    node_type,
                    node_arch,
                }
            })
    }

    proptest! {
        #[test]
        fn register_requests_round_trip(req in request()) {
            prop_assert_eq!(RegisterRequest::parse(&req.to_bytes()), Ok(req));
        }

        #[test]
        fn parsing_arbitrary_bytes_never_panics_and_reencodes_exactly(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(req) = RegisterRequest::parse(&bytes) {
                let again = req.to_bytes();
                prop_assert_eq!(again.as_slice(), bytes.as_slice());
            }
            let _ = StateCode::parse_plaintext(&bytes);
            let _ = parse_register_reply_plaintext(&bytes);
            let _ = parse_reply_status(&bytes);
        }

        #[test]
        fn reply_plaintexts_round_trip(id in any::<[u8; 16]>()) {
            let id = Uuid::from_bytes(id);
            prop_assert_eq!(parse_register_reply_plaintext(&register_reply_plaintext(id)), Ok(id));
        }

        #[test]
        fn state_plaintexts_round_trip(code in prop::sample::select(StateCode::ALL.to_vec())) {
            prop_assert_eq!(StateCode::parse_plaintext(&code.plaintext()), Ok(code));
        }
    }
}
