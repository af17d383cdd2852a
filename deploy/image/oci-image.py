#!/usr/bin/env python3
"""Writes a container image as an OCI image-layout tar, with no container engine and no base
image: one uncompressed layer holding the given files, the shared libraries they link (found
with ldd) and the dynamic loader. Standard library only.

    deploy/image/oci-image.py --name local.test/svid-bridge:dev --out svid-bridge.tar \\
        --entrypoint /svid-bridge --cmd run --libs target/release/svid-bridge=/svid-bridge

    ctr -n k8s.io images import svid-bridge.tar      # containerd (the kubelet's runtime)
    podman load -i svid-bridge.tar                   # or skopeo copy oci-archive:svid-bridge.tar ...

`make image` builds the svid-bridge image this way (target/images/svid-bridge.tar), and the
end-to-end tests build every image of their test node with it (tests/common/cluster.rs).

Arguments:
  SRC=DEST            copy the host file SRC (symlinks followed) to DEST in the image
  --libs              also copy what every SRC=DEST binary links (ldd), at the paths ldd shows
  --link DEST=TARGET  a symlink in the image
  --dir DEST          an empty directory (mode 1777 for /tmp, 0755 otherwise)
  --env K=V           config Env (repeatable); PATH defaults to /usr/bin:/bin
  --entrypoint A,B    config Entrypoint (comma separated); --cmd likewise for Cmd
  --workdir DIR       config WorkingDir

The layer is reproducible: every entry has mtime 0 and owner root, in sorted order.
"""

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile


def ldd(path):
    """The absolute paths of the shared objects `path` loads (none for a static binary)."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True)
    if out.returncode != 0:
        # "not a dynamic executable": static, nothing to add.
        return []
    libs = []
    for line in out.stdout.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(0x", line) or re.match(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
        elif "=> not found" in line:
            sys.exit(f"oci-image: {path} links {line.split()[0]}, which ldd cannot find")
    return libs


def parents(dest):
    parts = dest.strip("/").split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def tar_info(name, kind, mode, size=0, target=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = target
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def build_layer(files, links, dirs):
    """files: {dest: src}; links: {dest: target}; dirs: [dest]. Returns the layer tar bytes."""
    entries = {}  # name (no leading slash) -> (TarInfo, bytes or None)
    for dest in list(files) + list(links) + list(dirs):
        for parent in parents(dest):
            entries.setdefault(parent, (tar_info(parent, tarfile.DIRTYPE, 0o755), None))
    for dest in dirs:
        name = dest.strip("/")
        mode = 0o1777 if name == "tmp" else 0o755
        entries[name] = (tar_info(name, tarfile.DIRTYPE, mode), None)
    for dest, target in links.items():
        name = dest.strip("/")
        entries[name] = (tar_info(name, tarfile.SYMTYPE, 0o777, target=target), None)
    for dest, src in files.items():
        name = dest.strip("/")
        with open(src, "rb") as f:
            data = f.read()
        mode = os.stat(src).st_mode & 0o7777
        entries[name] = (tar_info(name, tarfile.REGTYPE, mode, size=len(data)), data)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            info, data = entries[name]
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def blob(content):
    digest = hashlib.sha256(content).hexdigest()
    return digest, content


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="image reference, e.g. local.test/svid-bridge:dev")
    p.add_argument("--out", required=True, help="the OCI image-layout tar to write")
    p.add_argument("--libs", action="store_true")
    p.add_argument("--link", action="append", default=[])
    p.add_argument("--dir", action="append", default=[])
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--entrypoint", default="")
    p.add_argument("--cmd", default="")
    p.add_argument("--workdir", default="")
    p.add_argument("files", nargs="*", metavar="SRC=DEST")
    args = p.parse_args()

    files = {}
    for spec in args.files:
        src, sep, dest = spec.partition("=")
        if not sep or not dest.startswith("/"):
            sys.exit(f"oci-image: {spec!r} is not SRC=/DEST")
        if not os.path.isfile(src):
            sys.exit(f"oci-image: {src} is not a file")
        files[dest] = os.path.realpath(src)
    if args.libs:
        for src in list(files.values()):
            for lib in ldd(src):
                files.setdefault(lib, os.path.realpath(lib))
    links = {}
    for spec in args.link:
        dest, sep, target = spec.partition("=")
        if not sep or not dest.startswith("/"):
            sys.exit(f"oci-image: --link {spec!r} is not /DEST=TARGET")
        links[dest] = target

    layer_digest, layer = blob(build_layer(files, links, args.dir))
    env = list(args.env)
    if not any(e.startswith("PATH=") for e in env):
        env.append("PATH=/usr/bin:/bin")
    config = {
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
        "os": "linux",
        "config": {"Env": env},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + layer_digest]},
        "history": [{"created_by": "deploy/image/oci-image.py"}],
    }
    if args.entrypoint:
        config["config"]["Entrypoint"] = args.entrypoint.split(",")
    if args.cmd:
        config["config"]["Cmd"] = args.cmd.split(",")
    if args.workdir:
        config["config"]["WorkingDir"] = args.workdir
    config_digest, config_bytes = blob(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + config_digest,
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": "sha256:" + layer_digest,
                "size": len(layer),
            }
        ],
    }
    manifest_digest, manifest_bytes = blob(json.dumps(manifest, sort_keys=True).encode())
    tag = args.name.rsplit(":", 1)[1] if ":" in args.name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + manifest_digest,
                "size": len(manifest_bytes),
                "annotations": {
                    # containerd (ctr images import) names the image after this one;
                    # podman and skopeo use the OCI tag.
                    "io.containerd.image.name": args.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }
        ],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with tarfile.open(tmp, mode="w") as out:
        def add(name, data):
            out.addfile(tar_info(name, tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))

        for d in ["blobs", "blobs/sha256"]:
            out.addfile(tar_info(d, tarfile.DIRTYPE, 0o755))
        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index, sort_keys=True).encode())
        add("blobs/sha256/" + config_digest, config_bytes)
        add("blobs/sha256/" + manifest_digest, manifest_bytes)
        add("blobs/sha256/" + layer_digest, layer)
    os.replace(tmp, args.out)
    print(f"{args.out}: {args.name}, {len(files)} files, layer {len(layer) // 1024} KiB")


if __name__ == "__main__":
    main()
