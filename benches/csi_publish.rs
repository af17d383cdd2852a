//! NodePublishVolume + NodeUnpublishVolume latency over gRPC (1,000 of each) with the
//! namespace's ~20 mounts and with 10,000 more, next to the cost of the two ways to ask
//! "is this a mount point": a /proc/self/mountinfo scan (spiffe-csi-driver, M-1) and
//! statx STATX_ATTR_MOUNT_ROOT (what svid-bridge does).
//!
//! `cargo bench --bench csi_publish`. Needs root: the benchmark re-executes itself under
//! `unshare -m --propagation private`, so its mounts never reach the host.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use svid_bridge::testing::mount_ns;

use rustix::fs::{AtFlags, CWD, StatxAttributes, StatxFlags};
use svid_bridge::testing::csi::{
    Plugin, add_mounts, publish_request, remove_mounts, total_mounts, unpublish_request,
};

const CALLS: usize = 1000;
const EXTRA_MOUNTS: usize = 10_000;

fn main() -> ExitCode {
    if !mount_ns::in_private_mount_ns() {
        return mount_ns::reexec_in_private_mount_ns();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
    ExitCode::SUCCESS
}

struct Row {
    mounts: usize,
    publish: Vec<Duration>,
    unpublish: Vec<Duration>,
    mountinfo_scan: Vec<Duration>,
    statx: Vec<Duration>,
}

async fn run() {
    let plugin = Plugin::start().await;
    let mut rows = vec![measure(&plugin, "a").await];
    let filler = plugin.root.join("filler");
    add_mounts(&filler, EXTRA_MOUNTS);
    rows.push(measure(&plugin, "b").await);
    remove_mounts(&filler, EXTRA_MOUNTS); // so the temporary directory can be deleted
    print_table(&rows);
    plugin.stop().await.unwrap();
}

async fn measure(plugin: &Plugin, round: &str) -> Row {
    let mut node = plugin.node().await;
    let targets: Vec<PathBuf> = (0..CALLS)
        .map(|i| plugin.target(&format!("{round}-{i}"), "spiffe"))
        .collect();
    let mounts = total_mounts();
    let (mut publish, mut unpublish) = (Vec::with_capacity(CALLS), Vec::with_capacity(CALLS));
    let (mut mountinfo_scan, mut statx) = (Vec::with_capacity(CALLS), Vec::with_capacity(CALLS));
    for (i, target) in targets.iter().enumerate() {
        let id = format!("csi-{round}-{i}");
        let start = Instant::now();
        node.node_publish_volume(publish_request(&id, target))
            .await
            .unwrap();
        publish.push(start.elapsed());

        let start = Instant::now();
        assert!(svid_bridge::csi::mountinfo::is_mount_point(target).unwrap());
        mountinfo_scan.push(start.elapsed());
        let start = Instant::now();
        assert!(is_mount_root(target));
        statx.push(start.elapsed());

        let start = Instant::now();
        node.node_unpublish_volume(unpublish_request(&id, target))
            .await
            .unwrap();
        unpublish.push(start.elapsed());
    }
    Row {
        mounts,
        publish,
        unpublish,
        mountinfo_scan,
        statx,
    }
}

fn is_mount_root(path: &Path) -> bool {
    let stx = rustix::fs::statx(CWD, path, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::TYPE).unwrap();
    stx.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn fmt(d: Duration) -> String {
    if d >= Duration::from_millis(1) {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "\nCSI NodePublishVolume / NodeUnpublishVolume over gRPC on a Unix socket, {CALLS} calls each,"
    );
    println!("private mount namespace; mount-point check costs measured on a published target.\n");
    println!(
        "| mounts in namespace | publish p50 | publish p99 | unpublish p50 | unpublish p99 | mountinfo scan p50 | statx p50 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.mounts,
            fmt(percentile(&row.publish, 50.0)),
            fmt(percentile(&row.publish, 99.0)),
            fmt(percentile(&row.unpublish, 50.0)),
            fmt(percentile(&row.unpublish, 99.0)),
            fmt(percentile(&row.mountinfo_scan, 50.0)),
            fmt(percentile(&row.statx, 50.0)),
        );
    }
}
