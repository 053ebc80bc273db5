//! zlib's CRC-32, which a checkpoint's `meta.json` may record beside the SHA-256 of a file (docs/PROTOCOL.md 6:
//! a loader verifies a file by its CRC-32 when one is recorded, else by its SHA-256).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// zlib's CRC-32 (polynomial 0xEDB88320), one table byte at a time: what a `"crc32"` of `meta.json` records.
pub(crate) struct Crc32 {
    table: [u32; 256],
    value: u32,
}

impl Crc32 {
    fn new() -> Crc32 {
        let mut table = [0u32; 256];
        for (n, entry) in table.iter_mut().enumerate() {
            let mut c = n as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *entry = c;
        }
        Crc32 { table, value: 0xFFFF_FFFF }
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.value = self.table[((self.value ^ u32::from(b)) & 0xFF) as usize] ^ (self.value >> 8);
        }
    }

    fn finish(&self) -> u32 {
        self.value ^ 0xFFFF_FFFF
    }
}

/// CRC-32 (zlib's) and size of a file.
pub fn crc32_file(path: &Path) -> io::Result<(u32, u64)> {
    let mut file = File::open(path)?;
    let mut crc = Crc32::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        crc.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((crc.finish(), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_zlibs() {
        let mut crc = Crc32::new();
        crc.update(b"123456789");
        assert_eq!(crc.finish(), 0xCBF4_3926); // the check value of CRC-32/ISO-HDLC, zlib.crc32(b"123456789")
        assert_eq!(Crc32::new().finish(), 0);
    }
}
