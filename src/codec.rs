//! tokio-util codecs: the glue between sockets and the sans-I/O `wire` layer.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::wire::DecodeError;
use crate::wire::envelope::{self, BadFrame, Echo, Header};

/// Frames of one fixed length: an ijam registration ciphertext (the modulus size),
/// a state request (48 bytes) or a certificate request (4 bytes).
///
/// The upstream listener decrypted each TCP read on its own, so a request split
/// across two reads failed; this decoder accumulates exactly `len` bytes instead.
#[derive(Debug, Clone, Copy)]
pub struct FixedFrameCodec {
    len: usize,
}

impl FixedFrameCodec {
    pub fn new(len: usize) -> Self {
        assert!(len > 0, "frames have at least one byte");
        FixedFrameCodec { len }
    }
}

impl Decoder for FixedFrameCodec {
    type Item = BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, std::io::Error> {
        if src.len() < self.len {
            src.reserve(self.len - src.len());
            return Ok(None);
        }
        Ok(Some(src.split_to(self.len)))
    }
}

impl Encoder<Bytes> for FixedFrameCodec {
    type Error = std::io::Error;

    /// Replies are whole, already-encoded messages of any length.
    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

/// One envelope frame: the checked header and the payload (a slice of the read
/// buffer, not a copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeFrame {
    pub header: Header,
    pub payload: Bytes,
}

impl EnvelopeFrame {
    pub fn new(header: Header, payload: impl Into<Bytes>) -> Self {
        EnvelopeFrame {
            header,
            payload: payload.into(),
        }
    }

    /// The whole frame as bytes (header, payload, CRC).
    pub fn to_vec(&self) -> Vec<u8> {
        envelope::to_vec(&self.header, &self.payload)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeCodecError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Not a frame: the connection cannot be resynchronised. `echo` says whether a
    /// 400 reply can name the request.
    #[error("bad frame: {0}")]
    Frame(BadFrame),
}

/// The envelope codec (`wire::envelope`): frames on a TCP stream with `Framed`, and
/// one frame per UDP datagram with [`EnvelopeCodec::decode_datagram`].
///
/// The declared payload length is checked against the maximum from the header alone,
/// before any room is reserved for the payload; a bad frame clears the buffer (the
/// stream cannot be resynchronised) and is an error carrying what a reply can echo.
/// Bytes a partial frame reserves beyond what has arrived, at most.
const RESERVE_AHEAD: usize = 64 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct EnvelopeCodec {
    max_payload: u32,
}

impl EnvelopeCodec {
    pub fn new(max_payload: u32) -> Self {
        EnvelopeCodec { max_payload }
    }

    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// A UDP datagram: exactly one frame, no more, no less.
    pub fn decode_datagram(&self, datagram: Bytes) -> Result<EnvelopeFrame, BadFrame> {
        let (header, payload) = envelope::parse_datagram(&datagram, self.max_payload)?;
        let start = envelope::HEADER_LEN;
        Ok(EnvelopeFrame {
            header,
            payload: datagram.slice(start..start + payload.len()),
        })
    }
}

impl Decoder for EnvelopeCodec {
    type Item = EnvelopeFrame;
    type Error = EnvelopeCodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<EnvelopeFrame>, EnvelopeCodecError> {
        match envelope::check(src, self.max_payload) {
            Ok(None) => {
                // Room for what is coming, but never more than a chunk ahead of what
                // arrived: a header declaring a large frame costs only what is sent.
                src.reserve(envelope::missing(src, self.max_payload).min(RESERVE_AHEAD));
                Ok(None)
            }
            Ok(Some(framed)) => {
                let frame = src.split_to(framed.len).freeze();
                Ok(Some(EnvelopeFrame {
                    header: framed.header,
                    payload: frame.slice(envelope::HEADER_LEN..framed.len - envelope::TRAILER_LEN),
                }))
            }
            Err(bad) => {
                src.clear();
                Err(EnvelopeCodecError::Frame(bad))
            }
        }
    }

    /// At end of stream, a partial frame is a truncated frame (a 400 can still name it
    /// once its request id arrived).
    fn decode_eof(
        &mut self,
        src: &mut BytesMut,
    ) -> Result<Option<EnvelopeFrame>, EnvelopeCodecError> {
        if let Some(frame) = self.decode(src)? {
            return Ok(Some(frame));
        }
        if src.is_empty() {
            return Ok(None);
        }
        let bad = BadFrame {
            echo: Echo::read(src),
            error: DecodeError::Length {
                expected: src.len() + envelope::missing(src, self.max_payload).max(1),
                got: src.len(),
            },
        };
        src.clear();
        Err(EnvelopeCodecError::Frame(bad))
    }
}

impl Encoder<EnvelopeFrame> for EnvelopeCodec {
    type Error = EnvelopeCodecError;

    fn encode(
        &mut self,
        item: EnvelopeFrame,
        dst: &mut BytesMut,
    ) -> Result<(), EnvelopeCodecError> {
        let start = dst.len();
        dst.resize(start + envelope::frame_len(item.payload.len()), 0);
        envelope::encode_into(&item.header, &item.payload, &mut dst[start..]).map_err(|e| {
            dst.truncate(start);
            std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_only_whole_frames_across_split_reads() {
        let mut codec = FixedFrameCodec::new(4);
        let mut buf = BytesMut::from(&b"ab"[..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"cdef");
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"abcd");
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], b"ef");
    }

    use crate::wire::envelope::{Flow, Kind, Status};

    fn frame(id: u32, payload: &'static [u8]) -> EnvelopeFrame {
        EnvelopeFrame::new(Header::request(Flow::PUBKEY, Kind(2), id), payload)
    }

    #[test]
    fn envelope_frames_decode_across_split_reads_and_pipelined_in_one_read() {
        let mut codec = EnvelopeCodec::new(64);
        let mut wire = BytesMut::new();
        for (id, payload) in [(1, &b"one"[..]), (2, b""), (3, b"three")] {
            codec.encode(frame(id, payload), &mut wire).unwrap();
        }
        let bytes = wire.freeze();
        // Byte by byte: nothing until a frame is whole, then exactly that frame.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in bytes.iter() {
            buf.extend_from_slice(&[*b]);
            if let Some(f) = codec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, [frame(1, b"one"), frame(2, b""), frame(3, b"three")]);
        assert!(buf.is_empty());
        // All three in one read.
        let mut buf = BytesMut::from(&bytes[..]);
        for id in 1..=3 {
            assert_eq!(
                codec.decode(&mut buf).unwrap().unwrap().header.request_id,
                id
            );
        }
        assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
    }

    #[test]
    fn oversized_declared_lengths_fail_before_any_reservation() {
        let mut codec = EnvelopeCodec::new(16);
        let mut header = frame(7, b"").to_vec();
        header[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut buf = BytesMut::from(&header[..16]);
        let cap = buf.capacity();
        match codec.decode(&mut buf) {
            Err(EnvelopeCodecError::Frame(bad)) => {
                assert_eq!(bad.echo.unwrap().request_id, 7);
                assert_eq!(
                    bad.error,
                    DecodeError::TooLong {
                        len: u32::MAX,
                        max: 16
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(buf.is_empty() && buf.capacity() <= cap.max(64));
    }

    #[test]
    fn a_partial_frame_at_eof_is_truncated_with_its_echo_when_readable() {
        let mut codec = EnvelopeCodec::new(64);
        let bytes = frame(9, b"payload").to_vec();
        for (len, echo) in [(5, false), (12, true), (20, true)] {
            let mut buf = BytesMut::from(&bytes[..len]);
            assert_eq!(codec.decode(&mut buf).unwrap(), None);
            match codec.decode_eof(&mut buf) {
                Err(EnvelopeCodecError::Frame(bad)) => {
                    assert_eq!(bad.echo.is_some(), echo, "{len}");
                    assert!(matches!(bad.error, DecodeError::Length { got, .. } if got == len));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn datagrams_carry_exactly_one_frame() {
        let codec = EnvelopeCodec::new(64);
        let one = frame(4, b"abc").to_vec();
        assert_eq!(
            codec.decode_datagram(Bytes::from(one.clone())).unwrap(),
            frame(4, b"abc")
        );
        let two = [one.clone(), one.clone()].concat();
        assert!(codec.decode_datagram(Bytes::from(two)).is_err());
        assert!(
            codec
                .decode_datagram(Bytes::from(one[..22].to_vec()))
                .is_err()
        );
        let reply = EnvelopeFrame::new(frame(4, b"").header.reply(Status::OK), &b"x"[..]);
        let mut out = BytesMut::from(&[0xa5u8; 3][..]);
        codec.clone().encode(reply.clone(), &mut out).unwrap();
        assert_eq!(&out[..3], &[0xa5; 3], "appends after what was there");
        assert_eq!(
            codec.decode_datagram(out.freeze().slice(3..)).unwrap(),
            reply
        );
    }
}
