//! Cost of the TUN offloads per 64 KiB of a TCP flow: splitting one
//! super-packet from the kernel into MTU-sized segments, and coalescing
//! those segments back into one frame for the kernel; and per small UDP
//! datagram: joining 64 of them into one USO frame, or passing them alone.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use weft_dataplane::offload::{
    split, Coalescer, GsoType, VirtioNetHdr, NEEDS_CSUM, VIRTIO_NET_HDR_LEN,
};

const MTU: usize = 1420;
const MSS: u16 = 1380;

/// A 64 KiB IPv4 TCP super-packet as the kernel hands it over. The partial
/// checksum is zero rather than the pseudo-header sum: segmentation
/// recomputes every checksum in full, so the cost is the same.
fn super_frame() -> Vec<u8> {
    let payload = 65_535 - 40;
    let header = VirtioNetHdr {
        flags: NEEDS_CSUM,
        gso_type: GsoType::TcpV4,
        ecn: false,
        hdr_len: 40,
        gso_size: MSS,
        csum_start: 20,
        csum_offset: 16,
    };
    let mut frame = vec![0u8; VIRTIO_NET_HDR_LEN];
    let mut bytes = [0u8; VIRTIO_NET_HDR_LEN];
    header.encode(&mut bytes);
    frame.copy_from_slice(&bytes);
    frame.extend_from_slice(&[0x45, 0, 0xff, 0xff, 0, 1, 0x40, 0, 64, 6, 0, 0]);
    frame.extend_from_slice(&[100, 64, 0, 1, 100, 64, 0, 2]);
    frame.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 1, 0, 0, 0, 1]);
    frame.extend_from_slice(&[0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    frame.extend((0..payload).map(|i| i as u8));
    frame
}

fn offload(c: &mut Criterion) {
    let original = super_frame();
    let mut segments = Vec::new();
    if let Err(e) = split(&mut original.clone(), MTU, &mut Vec::new(), |p| {
        segments.push(p.to_vec());
    }) {
        eprintln!("the bench frame is malformed: {e}");
        return;
    }

    let mut group = c.benchmark_group("offload");
    group.throughput(Throughput::Bytes(original.len() as u64));
    let mut frame = original.clone();
    let mut scratch = Vec::new();
    group.bench_function("split_64k", |b| {
        b.iter(|| {
            frame.copy_from_slice(&original);
            let mut count = 0;
            let _ = split(&mut frame, MTU, &mut scratch, |p| {
                count += black_box(p).len()
            });
            count
        });
    });
    let mut coalescer = Coalescer::new(true);
    group.bench_function("coalesce_64k", |b| {
        b.iter(|| {
            for segment in &segments {
                coalescer.push(segment);
            }
            let frames = coalescer
                .finish()
                .map(|f| black_box(f).len())
                .sum::<usize>();
            coalescer.clear();
            frames
        });
    });
    group.finish();

    let datagrams = udp_datagrams();
    let mut check = Coalescer::new(true);
    for datagram in &datagrams {
        check.push(datagram);
    }
    if check.finish().count() != 1 {
        eprintln!("the bench datagrams do not coalesce into one frame");
        return;
    }
    let mut group = c.benchmark_group("offload_udp");
    group.throughput(Throughput::Elements(datagrams.len() as u64));
    let mut uso = Coalescer::new(true);
    group.bench_function("coalesce_64x64B", |b| {
        b.iter(|| {
            for datagram in &datagrams {
                uso.push(datagram);
            }
            let frames = uso.finish().map(|f| black_box(f).len()).sum::<usize>();
            uso.clear();
            frames
        });
    });
    let mut plain = Coalescer::new(false);
    group.bench_function("pass_64x64B", |b| {
        b.iter(|| {
            for datagram in &datagrams {
                plain.push(datagram);
            }
            let frames = plain.finish().map(|f| black_box(f).len()).sum::<usize>();
            plain.clear();
            frames
        });
    });
    group.finish();
}

/// 64 consecutive IPv4 UDP datagrams of one flow with 64-byte payloads and
/// valid checksums: what a small-packet flood hands the device per flush.
fn udp_datagrams() -> Vec<Vec<u8>> {
    (0..64u16)
        .map(|n| {
            let mut d = vec![0x45, 0, 0, 92];
            d.extend_from_slice(&n.to_be_bytes());
            d.extend_from_slice(&[0x40, 0, 64, 17, 0, 0, 100, 64, 0, 1, 100, 64, 0, 2]);
            d.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0, 72, 0, 0]);
            d.extend((0..64u8).map(|i| i ^ n as u8));
            let header = ones_complement(&d[..20], 0);
            d[10..12].copy_from_slice(&header.to_be_bytes());
            // Pseudo-header: addresses, protocol, UDP length.
            let pseudo = ones_complement(&d[12..20], 17 + 72);
            let sum = ones_complement(&d[20..], u32::from(!pseudo));
            d[26..28].copy_from_slice(&sum.to_be_bytes());
            d
        })
        .collect()
}

/// The complement of the one's-complement sum of `data` and `initial`.
fn ones_complement(data: &[u8], initial: u32) -> u16 {
    let mut acc = initial;
    for pair in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

criterion_group!(benches, offload);
criterion_main!(benches);
