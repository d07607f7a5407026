//! What the connection-parser fuzz targets share: the input script format.
//!
//! After each target's own flags byte, the input is records of
//! `ctl [len] [missing] bytes…`: ctl bit 7 picks the direction (0: the
//! side that speaks first), bit 6 announces a `missing` byte (a capture gap
//! before the piece: the byte itself if < 128, else the byte × 256), bits
//! 0..5 are the piece length (0: the length is the next byte × 16 + 1).

/// One piece of traffic to feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece<'a> {
    /// Sent by the side that speaks first (ctl bit 7 clear).
    pub first_side: bool,
    pub bytes: &'a [u8],
    /// Bytes the capture missed before this piece.
    pub missing: u64,
}

/// The pieces of a script, until it ends or a record is cut short.
pub fn pieces(script: &[u8]) -> Pieces<'_> {
    Pieces { rest: script }
}

pub struct Pieces<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Pieces<'a> {
    type Item = Piece<'a>;

    fn next(&mut self) -> Option<Piece<'a>> {
        let (&ctl, mut tail) = self.rest.split_first()?;
        let mut len = usize::from(ctl & 0x3f);
        if len == 0 {
            let (&b, t) = tail.split_first()?;
            len = usize::from(b) * 16 + 1;
            tail = t;
        }
        let mut missing = 0u64;
        if ctl & 0x40 != 0 {
            let (&m, t) = tail.split_first()?;
            missing = if m < 128 {
                u64::from(m)
            } else {
                u64::from(m) << 8
            };
            tail = t;
        }
        let (bytes, rest) = tail.split_at(len.min(tail.len()));
        self.rest = rest;
        Some(Piece {
            first_side: ctl & 0x80 == 0,
            bytes,
            missing,
        })
    }
}
