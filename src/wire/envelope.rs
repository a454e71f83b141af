//! The envelope (docs/design.md "The envelope"): the frame every flow but `ijam` travels in,
//! on the envelope port (8447, TCP and UDP). Byte layout: `schemas/envelope.json`;
//! semantics: `schemas/envelope.md`.
//!
//! ```text
//!  0      2   3    4    5     6        8            12             16        16+n
//!  +------+---+----+----+-----+--------+------------+--------------+---------+-----------+
//!  | "RG" | 1 |flow|kind|flags| status | request id | payload len n| payload | CRC-32C   |
//!  +------+---+----+----+-----+--------+------------+--------------+---------+-----------+
//!   all integers big-endian; the CRC-32C (Castagnoli) covers bytes 0 .. 16+n
//! ```
//!
//! One frame per UDP datagram; a stream of frames on TCP. Replies set bit 7 of `kind`
//! and echo `flow` and `request id`, so a TCP peer may pipeline and match replies that
//! come back in any order. Sans-I/O: [`check`] looks at a buffer and says "need more",
//! "here is a whole, CRC-checked frame of N bytes", or why the bytes are no frame;
//! `crate::codec::EnvelopeCodec` drives it for tokio.

use std::fmt;

use crc::{CRC_32_ISCSI, Crc, Table};
use zerocopy::byteorder::network_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::DecodeError;

pub const MAGIC: [u8; 2] = *b"RG";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;
pub const TRAILER_LEN: usize = 4;
/// Header and CRC: a frame is this many bytes plus its payload.
pub const OVERHEAD: usize = HEADER_LEN + TRAILER_LEN;
/// Default bound on the declared payload length (`--max-frame`).
pub const DEFAULT_MAX_PAYLOAD: u32 = 16 * 1024;
/// The request id sits at bytes 8..12: a reply can name it once 12 bytes are in.
pub const ECHO_LEN: usize = 12;

/// CRC-32C (Castagnoli, the iSCSI polynomial), slice-by-16.
static CRC32C: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

pub fn crc32c(bytes: &[u8]) -> u32 {
    CRC32C.checksum(bytes)
}

/// The 16-byte header as laid out on the wire; accepts any bytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    pub magic: [u8; 2],
    pub version: u8,
    pub flow: u8,
    pub kind: u8,
    pub flags: u8,
    pub status: U16,
    pub request_id: U32,
    pub length: U32,
}
const _: () = assert!(size_of::<RawHeader>() == HEADER_LEN);

/// Which flow a frame belongs to. Open: unknown values stay representable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow(pub u8);

impl Flow {
    pub const CORE: Flow = Flow(0);
    pub const PUBKEY: Flow = Flow(1);
    pub const TOKEN: Flow = Flow(2);
    pub const ONBOARD: Flow = Flow(3);
    pub const ENROLL: Flow = Flow(4);

    /// The flow's name, for logs and the Hello reply; `None` for unknown values.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Flow::CORE => "core",
            Flow::PUBKEY => "pubkey",
            Flow::TOKEN => "token",
            Flow::ONBOARD => "onboard",
            Flow::ENROLL => "enroll",
            _ => return None,
        })
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "flow {}", self.0),
        }
    }
}

/// Message type within a flow; bit 7 marks a reply. The per-flow constants live in
/// that flow's wire module (`wire::core::HELLO`, `wire::pubkey::REGISTER`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kind(pub u8);

impl Kind {
    pub const REPLY_BIT: u8 = 0x80;

    /// The kind of the reply to this request.
    pub fn reply(self) -> Kind {
        Kind(self.0 | Self::REPLY_BIT)
    }

    pub fn is_reply(self) -> bool {
        self.0 & Self::REPLY_BIT != 0
    }

    /// The request kind a reply answers.
    pub fn request(self) -> Kind {
        Kind(self.0 & !Self::REPLY_BIT)
    }
}

/// Header flags. Only bit 0 is defined (sealed payload, not served yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(pub u8);

impl Flags {
    pub const NONE: Flags = Flags(0);
    pub const SEALED: Flags = Flags(0x01);
}

/// Reply status (0 in requests). Open: unknown values stay representable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u16);

impl Status {
    pub const REQUEST: Status = Status(0);
    pub const OK: Status = Status(200);
    pub const CREATED: Status = Status(201);
    pub const BAD_REQUEST: Status = Status(400);
    pub const UNAUTHORIZED: Status = Status(401);
    pub const FORBIDDEN: Status = Status(403);
    pub const NOT_FOUND: Status = Status(404);
    pub const CONFLICT: Status = Status(409);
    pub const GONE: Status = Status(410);
    /// The reply would break the UDP rules: retry over TCP, or pad the request.
    pub const PAYLOAD_TOO_LARGE: Status = Status(413);
    pub const TOO_MANY_REQUESTS: Status = Status(429);
    pub const SERVICE_UNAVAILABLE: Status = Status(503);

    pub fn is_success(self) -> bool {
        (200..300).contains(&self.0)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A header past the framing checks (magic, version, length bound, CRC). Every field
/// is an open newtype: whether a flow, kind or flag is served is the server's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub flow: Flow,
    pub kind: Kind,
    pub flags: Flags,
    pub status: Status,
    pub request_id: u32,
}

impl Header {
    pub fn request(flow: Flow, kind: Kind, request_id: u32) -> Header {
        Header {
            flow,
            kind,
            flags: Flags::NONE,
            status: Status::REQUEST,
            request_id,
        }
    }

    /// The header of the reply to `self`: same flow and id, kind with bit 7 set.
    pub fn reply(&self, status: Status) -> Header {
        Header {
            flow: self.flow,
            kind: self.kind.reply(),
            flags: Flags::NONE,
            status,
            request_id: self.request_id,
        }
    }

    /// The 16 bytes of this header on the wire with a payload of `payload_len` (what a
    /// sealed payload takes as its associated data).
    pub fn to_bytes(&self, payload_len: u32) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(self.raw(payload_len).as_bytes());
        out
    }

    fn raw(&self, payload_len: u32) -> RawHeader {
        RawHeader {
            magic: MAGIC,
            version: VERSION,
            flow: self.flow.0,
            kind: self.kind.0,
            flags: self.flags.0,
            status: U16::new(self.status.0),
            request_id: U32::new(self.request_id),
            length: U32::new(payload_len),
        }
    }
}

impl From<&RawHeader> for Header {
    fn from(raw: &RawHeader) -> Header {
        Header {
            flow: Flow(raw.flow),
            kind: Kind(raw.kind),
            flags: Flags(raw.flags),
            status: Status(raw.status.get()),
            request_id: raw.request_id.get(),
        }
    }
}

/// What a reply to an unreadable frame can still echo: bytes 3, 4 and 8..12.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo {
    pub flow: Flow,
    pub kind: Kind,
    pub request_id: u32,
}

impl Echo {
    /// Present once the first 12 bytes are in (whatever they hold).
    pub fn read(bytes: &[u8]) -> Option<Echo> {
        let b: &[u8; ECHO_LEN] = bytes.get(..ECHO_LEN)?.try_into().ok()?;
        Some(Echo {
            flow: Flow(b[3]),
            kind: Kind(b[4]),
            request_id: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        })
    }

    /// The header of the error reply to this frame.
    pub fn reply(&self, status: Status) -> Header {
        Header::request(self.flow, self.kind, self.request_id).reply(status)
    }
}

/// Bytes that are no frame, and what of them a reply can echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct BadFrame {
    pub echo: Option<Echo>,
    pub error: DecodeError,
}

impl BadFrame {
    fn at(buf: &[u8], error: DecodeError) -> BadFrame {
        BadFrame {
            echo: Echo::read(buf),
            error,
        }
    }
}

/// A whole frame at the front of a buffer: its header and total length (header,
/// payload and CRC). The payload is `buf[HEADER_LEN .. len - TRAILER_LEN]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framed {
    pub header: Header,
    pub len: usize,
}

impl Framed {
    pub fn payload<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[HEADER_LEN..self.len - TRAILER_LEN]
    }
}

/// Looks at the front of `buf`: `Ok(None)` until a whole frame is there (the header is
/// judged once all 16 bytes are in, so an error can echo the request id), then the
/// frame, CRC checked. The declared length is checked against `max_payload` before
/// anyone waits for (or reserves room for) the payload.
pub fn check(buf: &[u8], max_payload: u32) -> Result<Option<Framed>, BadFrame> {
    let Ok((raw, _)) = RawHeader::ref_from_prefix(buf) else {
        return Ok(None);
    };
    if raw.magic != MAGIC {
        return Err(BadFrame::at(buf, DecodeError::Magic { got: raw.magic }));
    }
    if raw.version != VERSION {
        return Err(BadFrame::at(buf, DecodeError::Version { got: raw.version }));
    }
    let len = raw.length.get();
    if len > max_payload {
        return Err(BadFrame::at(
            buf,
            DecodeError::TooLong {
                len,
                max: max_payload,
            },
        ));
    }
    let body = HEADER_LEN + len as usize;
    let Some(trailer) = buf.get(body..body + TRAILER_LEN) else {
        return Ok(None);
    };
    let got = u32::from_be_bytes(trailer.try_into().expect("4 bytes"));
    let expected = crc32c(&buf[..body]);
    if got != expected {
        return Err(BadFrame::at(buf, DecodeError::Crc { expected, got }));
    }
    Ok(Some(Framed {
        header: Header::from(raw),
        len: body + TRAILER_LEN,
    }))
}

/// Bytes a frame still needs beyond `buf` (after `check` said `Ok(None)`): at least
/// the rest of the header, then the rest of the frame. For reserving, never trusted
/// beyond what `check` has bounded.
pub fn missing(buf: &[u8], max_payload: u32) -> usize {
    match RawHeader::ref_from_prefix(buf) {
        Ok((raw, _)) if raw.length.get() <= max_payload => {
            (OVERHEAD + raw.length.get() as usize).saturating_sub(buf.len())
        }
        Ok(_) => 0,
        Err(_) => HEADER_LEN - buf.len(),
    }
}

/// Exactly one frame, as a UDP datagram must be: a short datagram and trailing bytes
/// are length errors.
pub fn parse_datagram(datagram: &[u8], max_payload: u32) -> Result<(Header, &[u8]), BadFrame> {
    match check(datagram, max_payload)? {
        Some(framed) if framed.len == datagram.len() => {
            Ok((framed.header, framed.payload(datagram)))
        }
        Some(framed) => Err(BadFrame::at(
            datagram,
            DecodeError::Length {
                expected: framed.len,
                got: datagram.len(),
            },
        )),
        None => Err(BadFrame::at(
            datagram,
            DecodeError::Length {
                expected: datagram.len() + missing(datagram, max_payload).max(1),
                got: datagram.len(),
            },
        )),
    }
}

/// The length of a frame carrying `payload_len` bytes.
pub fn frame_len(payload_len: usize) -> usize {
    OVERHEAD + payload_len
}

/// Writes header ‖ payload ‖ CRC into the front of `out` and returns the length
/// written. `out` must hold [`frame_len`] bytes; the payload must fit a u32.
pub fn encode_into(header: &Header, payload: &[u8], out: &mut [u8]) -> Result<usize, DecodeError> {
    let len = frame_len(payload.len());
    let payload_len = u32::try_from(payload.len()).map_err(|_| DecodeError::TooLong {
        len: u32::MAX,
        max: u32::MAX,
    })?;
    if out.len() < len {
        return Err(DecodeError::Length {
            expected: len,
            got: out.len(),
        });
    }
    out[..HEADER_LEN].copy_from_slice(header.raw(payload_len).as_bytes());
    out[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    let body = HEADER_LEN + payload.len();
    let crc = crc32c(&out[..body]);
    out[body..len].copy_from_slice(&crc.to_be_bytes());
    Ok(len)
}

/// Appends one frame to `out`.
pub fn encode(header: &Header, payload: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + frame_len(payload.len()), 0);
    encode_into(header, payload, &mut out[start..]).expect("sized above; payloads fit a u32");
}

/// One frame as a fresh vector.
pub fn to_vec(header: &Header, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame_len(payload.len()));
    encode(header, payload, &mut out);
    out
}

/// Reads a u16 length, then that many bytes; returns them and the rest.
pub fn take_prefixed<'a>(
    field: &'static str,
    bytes: &'a [u8],
) -> Result<(&'a [u8], &'a [u8]), DecodeError> {
    let (len, rest) = bytes.split_first_chunk::<2>().ok_or(DecodeError::Length {
        expected: 2,
        got: bytes.len(),
    })?;
    let len = u16::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return Err(DecodeError::Length {
            expected: len,
            got: rest.len(),
        });
    }
    if len == 0 {
        return Err(DecodeError::Empty { field });
    }
    Ok(rest.split_at(len))
}

/// Appends a u16 length and the bytes (at most 65 535 of them).
pub fn put_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("length-prefixed fields hold < 64 KiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = DEFAULT_MAX_PAYLOAD;

    /// A Register request (flow 1, kind 1), id 0x01020304, payload "abc".
    const FRAME: [u8; 23] = [
        b'R', b'G', 0x01, 0x01, 0x01, 0x00, 0x00,
        0x00, // magic, version, flow, kind, flags, status
        0x01, 0x02, 0x03, 0x04, // request id
        0x00, 0x00, 0x00, 0x03, // payload length
        b'a', b'b', b'c', // payload
        0x8a, 0x3e, 0xda, 0xaf, // CRC-32C of the 19 bytes before it
    ];

    fn header() -> Header {
        Header::request(Flow::PUBKEY, Kind(1), 0x0102_0304)
    }

    #[test]
    fn crc32c_is_castagnoli() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&FRAME[..19]), 0x8a3e_daaf);
    }

    #[test]
    fn byte_table_encodes_into_a_prefilled_buffer_and_decodes_back() {
        let mut buf = [0xa5u8; 40];
        let n = encode_into(&header(), b"abc", &mut buf).unwrap();
        assert_eq!(n, FRAME.len());
        assert_eq!(&buf[..n], &FRAME);
        assert!(
            buf[n..].iter().all(|&b| b == 0xa5),
            "nothing past the frame"
        );
        assert_eq!(to_vec(&header(), b"abc"), FRAME);

        let framed = check(&FRAME, MAX).unwrap().unwrap();
        assert_eq!(framed.header, header());
        assert_eq!(framed.len, 23);
        assert_eq!(framed.payload(&FRAME), b"abc");
        assert_eq!(
            parse_datagram(&FRAME, MAX).unwrap(),
            (header(), &b"abc"[..])
        );
    }

    #[test]
    fn replies_set_bit_7_and_echo_flow_and_id() {
        let reply = header().reply(Status::CREATED);
        let bytes = to_vec(&reply, &[]);
        assert_eq!(
            &bytes[..16],
            &[
                b'R', b'G', 1, 1, 0x81, 0, 0x00, 0xc9, 1, 2, 3, 4, 0, 0, 0, 0
            ]
        );
        assert_eq!(reply.kind.request(), Kind(1));
        assert!(reply.kind.is_reply() && !header().kind.is_reply());
        let framed = check(&bytes, 0).unwrap().unwrap();
        assert_eq!(framed.header, reply);
        assert_eq!(framed.len, 20);
    }

    #[test]
    fn every_truncation_needs_more_and_never_errors() {
        for len in 0..FRAME.len() {
            assert_eq!(check(&FRAME[..len], MAX), Ok(None), "{len} bytes");
            assert!(missing(&FRAME[..len], MAX) >= 1, "{len} bytes");
            let err = parse_datagram(&FRAME[..len], MAX).unwrap_err();
            assert!(matches!(err.error, DecodeError::Length { got, .. } if got == len));
            assert_eq!(err.echo.is_some(), len >= ECHO_LEN, "{len} bytes");
        }
        assert_eq!(missing(&FRAME[..0], MAX), 16);
        assert_eq!(missing(&FRAME[..16], MAX), 7);
    }

    #[test]
    fn trailing_bytes_are_one_more_frame_on_tcp_and_an_error_in_a_datagram() {
        let mut two = FRAME.to_vec();
        two.extend_from_slice(&FRAME);
        assert_eq!(check(&two, MAX).unwrap().unwrap().len, 23);
        let err = parse_datagram(&two, MAX).unwrap_err();
        assert_eq!(
            err.error,
            DecodeError::Length {
                expected: 23,
                got: 46
            }
        );
        assert_eq!(err.echo.unwrap().request_id, 0x0102_0304);
    }

    #[test]
    fn bad_magic_version_length_and_crc_carry_the_value_and_the_echo() {
        let echo = Some(Echo {
            flow: Flow::PUBKEY,
            kind: Kind(1),
            request_id: 0x0102_0304,
        });
        let with = |i: usize, b: u8| {
            let mut f = FRAME;
            f[i] = b;
            check(&f, MAX)
        };
        assert_eq!(
            with(0, b'X'),
            Err(BadFrame {
                echo,
                error: DecodeError::Magic { got: *b"XG" }
            })
        );
        assert_eq!(
            with(2, 2),
            Err(BadFrame {
                echo,
                error: DecodeError::Version { got: 2 }
            })
        );
        assert_eq!(
            with(20, 0x3f),
            Err(BadFrame {
                echo,
                error: DecodeError::Crc {
                    expected: 0x8a3e_daaf,
                    got: 0x8a3f_daaf
                }
            })
        );
        // A flipped payload bit is caught by the CRC too.
        assert!(matches!(
            with(17, b'B').unwrap_err().error,
            DecodeError::Crc { .. }
        ));
        // Longer than the maximum: refused from the header alone, before the payload.
        assert_eq!(
            check(&FRAME[..16], 2),
            Err(BadFrame {
                echo,
                error: DecodeError::TooLong { len: 3, max: 2 }
            })
        );
        let mut huge = FRAME;
        huge[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            check(&huge[..16], MAX).unwrap_err().error,
            DecodeError::TooLong {
                len: u32::MAX,
                max: MAX
            }
        );
        assert_eq!(missing(&huge[..16], MAX), 0, "never reserve for it");
    }

    #[test]
    fn pseudo_random_bytes_never_panic_and_round_trip_when_they_parse() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        for len in [0usize, 1, 11, 12, 15, 16, 19, 20, 23, 64, 300] {
            for round in 0..3000 {
                let mut bytes: Vec<u8> = (0..len).map(|_| next()).collect();
                // Half the time, a plausible header, so the deeper checks run too.
                if round % 2 == 0 && len >= 16 {
                    bytes[..3].copy_from_slice(&[b'R', b'G', 1]);
                    let payload = (len.saturating_sub(OVERHEAD)) as u32;
                    bytes[12..16].copy_from_slice(&payload.to_be_bytes());
                }
                let _ = missing(&bytes, MAX);
                if let Ok(Some(framed)) = check(&bytes, MAX) {
                    let again = to_vec(&framed.header, framed.payload(&bytes));
                    assert_eq!(&again[..], &bytes[..framed.len]);
                }
                if let Ok((h, payload)) = parse_datagram(&bytes, MAX) {
                    assert_eq!(to_vec(&h, payload), bytes);
                }
            }
        }
    }

    #[test]
    fn length_prefixed_fields() {
        let mut out = Vec::new();
        put_prefixed(&mut out, b"xyz");
        assert_eq!(out, [0, 3, b'x', b'y', b'z']);
        out.push(9);
        assert_eq!(take_prefixed("f", &out), Ok((&b"xyz"[..], &[9u8][..])));
        assert_eq!(
            take_prefixed("f", &out[..4]),
            Err(DecodeError::Length {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(
            take_prefixed("f", &[0]),
            Err(DecodeError::Length {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            take_prefixed("f", &[0, 0]),
            Err(DecodeError::Empty { field: "f" })
        );
    }

    #[test]
    fn encode_refuses_a_short_buffer() {
        let mut small = [0xa5u8; 22];
        assert_eq!(
            encode_into(&header(), b"abc", &mut small),
            Err(DecodeError::Length {
                expected: 23,
                got: 22
            })
        );
    }
}
