//! tokio-util codecs: the glue between sockets and the sans-I/O `wire` layer.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

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
}
