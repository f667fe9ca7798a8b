//! The hashing speeds BENCHMARKS.md quotes, on this machine: CRC64NVME (the part checksums),
//! BLAKE3 (the part manifest's blocks) and SHA-256 (the whole file), each over the same 256 MiB
//! in memory, fed 1 MiB (the manifest's block) at a time, three times.
//!
//! It also times what the server does with part CRCs: combining 128 of them (a 1 GiB file in
//! 8 MiB parts) into the whole object's CRC64NVME.
//!
//! Prints one JSON line per round: `{"crc64nvme_gbps":…,"blake3_gbps":…,"sha256_gbps":…,
//! "combine_128_parts_us":…}`.

use std::time::Instant;

use sha2::Digest;
use shared::hash::Crc64Nvme;

const BYTES: usize = 256 << 20;
const BLOCK: usize = 1 << 20;

fn main() {
    let data: Vec<u8> = (0..BYTES).map(|i| (i * 7 + i / 3) as u8).collect();
    // Each result feeds a sink, so no pass can be optimised away.
    let mut sink = 0u8;
    let gbps = |f: &mut dyn FnMut()| {
        let started = Instant::now();
        f();
        BYTES as f64 / started.elapsed().as_secs_f64() / 1e9
    };
    for _ in 0..3 {
        let crc = gbps(&mut || {
            for b in data.chunks(BLOCK) {
                sink ^= Crc64Nvme::of(b).to_base64().as_bytes()[0];
            }
        });
        let blake3 = gbps(&mut || {
            for b in data.chunks(BLOCK) {
                sink ^= blake3::hash(b).as_bytes()[0];
            }
        });
        let sha256 = gbps(&mut || {
            let mut whole = sha2::Sha256::new();
            for b in data.chunks(BLOCK) {
                whole.update(b);
            }
            sink ^= whole.finalize()[0];
        });
        let parts: Vec<(Crc64Nvme, u64)> = data
            .chunks(BLOCK)
            .take(128)
            .map(|b| (Crc64Nvme::of(b), 8 << 20))
            .collect();
        let started = Instant::now();
        sink ^= Crc64Nvme::of_pieces(parts).to_base64().as_bytes()[0];
        let combine_us = started.elapsed().as_micros();
        println!(
            "{{\"crc64nvme_gbps\":{crc:.2},\"blake3_gbps\":{blake3:.2},\"sha256_gbps\":{sha256:.2},\
             \"combine_128_parts_us\":{combine_us}}}"
        );
    }
    std::hint::black_box(sink);
}
