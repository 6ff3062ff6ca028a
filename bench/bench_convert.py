"""Benchmark of the `virt-v2v` converter on a real guest (a script, not a test; root only).

Builds a minimal bootable Debian 12 guest disk image the way a VMware Linux VM looks to the converter:
one MBR partition (ext4, mounted by UUID in /etc/fstab), the Debian kernel with its initramfs
(initramfs-tools), GRUB in the MBR with a generated grub.cfg, and open-vm-tools (which a conversion
removes). Built with debootstrap from the machine's Debian mirror (the first `URIs:` of
/etc/apt/sources.list.d/*.sources, else deb.debian.org) and cached as ~/.cache/oma/debian12-guest.raw,
so a rerun only converts. Then runs the project's converter plugin on a copy of it exactly as the
failover's `convert` step does (`virt-v2v-in-place -i disk <image>`, LIBGUESTFS_BACKEND=direct) and
prints the times. /dev/kvm is unusable on these machines, so libguestfs runs under TCG (`force_tcg`,
--backend-settings): expect ~15-20 min for the conversion, mostly the initramfs rebuild.

Needs the Debian packages debootstrap, fdisk (sfdisk), mount (losetup), util-linux (partx), e2fsprogs, qemu-utils and
virt-v2v (`apt-get install debootstrap virt-v2v`).

    sudo python3 bench/bench_convert.py [--rebuild] [--size-gb 2] [--backend-settings force_tcg]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oma.shared.plugins import get_backend, get_plugin_manager  # noqa: E402
from oma.shared.settings import Settings  # noqa: E402

CACHE = Path.home() / ".cache" / "oma" / "debian12-guest.raw"
SUITE = "bookworm"
PACKAGES = ("linux-image-amd64", "initramfs-tools", "systemd-sysv", "udev", "grub-pc", "open-vm-tools",
            "ifupdown", "netbase")
TOOLS = {"debootstrap": "debootstrap", "sfdisk": "fdisk", "losetup": "mount", "partx": "util-linux",
         "mkfs.ext4": "e2fsprogs", "qemu-img": "qemu-utils", "virt-v2v-in-place": "virt-v2v"}


def run(*argv: str, **kw) -> str:
    return subprocess.run(argv, check=True, text=True, stdout=subprocess.PIPE, **kw).stdout.strip()


def mirror() -> str:
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        found = re.search(r"^URIs:\s*(\S+/debian)\s*$", path.read_text(), re.M)
        if found:
            return found.group(1)
    return "http://deb.debian.org/debian"


@contextlib.contextmanager
def attached(image: Path) -> Iterator[str]:
    """The image as a loop device with its partitions (/dev/loopNp1)."""
    loop = run("losetup", "--find", "--show", "--partscan", str(image))
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


@contextlib.contextmanager
def mounted(device: str, root: Path) -> Iterator[list[Path]]:
    """The guest's root filesystem at `root`, with /dev, /proc and /sys bound for chrooted commands."""
    run("mount", device, str(root))
    binds: list[Path] = []
    try:
        yield binds
    finally:
        for target in reversed(binds):
            subprocess.run(["umount", "-l", str(target)], check=False)
        subprocess.run(["umount", str(root)], check=False)


def bind_system(root: Path, binds: list[Path]) -> None:
    for name in ("dev", "proc", "sys"):
        target = root / name
        target.mkdir(exist_ok=True)
        run("mount", "--bind", f"/{name}", str(target))
        binds.append(target)


def build(image: Path, size_gb: int) -> None:
    """debootstrap into the partition of a fresh raw image, then fstab, hostname and GRUB."""
    partial = image.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    run("qemu-img", "create", "-q", "-f", "raw", str(partial), f"{size_gb}G")
    run("sfdisk", "-q", str(partial), input="label: dos\nstart=2048, type=83, bootable\n")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    with attached(partial) as loop, tempfile.TemporaryDirectory(prefix="oma-guest-") as tmp:
        part, root = f"{loop}p1", Path(tmp)
        if not Path(part).exists():  # the attach's scan does not always add it here: ask again
            run("partx", "-a", loop)
        run("mkfs.ext4", "-q", "-L", "root", part)
        uuid = run("blkid", "-s", "UUID", "-o", "value", part)
        with mounted(part, root) as binds:
            started = time.perf_counter()
            subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                            str(root), mirror()], check=True, env=env, stdout=subprocess.DEVNULL)
            print(f"debootstrap: {time.perf_counter() - started:.0f} s")
            (root / "etc/fstab").write_text(f"UUID={uuid} / ext4 errors=remount-ro 0 1\n")
            (root / "etc/hostname").write_text("oma-guest\n")
            (root / "etc/network/interfaces").write_text("auto lo\niface lo inet loopback\n"
                                                         "auto ens192\niface ens192 inet dhcp\n")
            bind_system(root, binds)
            chroot = ("chroot", str(root))
            subprocess.run([*chroot, "grub-install", "--target=i386-pc", loop], check=True, env=env)
            subprocess.run([*chroot, "update-grub"], check=True, env=env)
    partial.rename(image)


async def convert(image: Path, backend_settings: str, timeout: float) -> dict:
    """The failover step's way: the `virt-v2v` converter plugin on the disk's path."""
    settings = Settings(convert_libguestfs_backend_settings=backend_settings, convert_timeout=timeout)
    converter = get_backend(get_plugin_manager(), "converter", "virt-v2v").factory(settings)
    converter.check()
    return await converter.convert(str(image))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help=f"build the guest again (cached: {CACHE})")
    parser.add_argument("--size-gb", type=int, default=2)
    parser.add_argument("--backend-settings", default="force_tcg", help="LIBGUESTFS_BACKEND_SETTINGS ('' on KVM)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    missing = [f"{tool} (package {pkg})" for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)}")
    if os.geteuid() != 0:
        raise SystemExit("root is needed (loop devices, mount, chroot)")
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    if args.rebuild or not CACHE.exists():
        started = time.perf_counter()
        build(CACHE, args.size_gb)
        print(f"guest image built in {time.perf_counter() - started:.0f} s: {CACHE}")
    else:
        print(f"guest image cached: {CACHE}")
    with tempfile.TemporaryDirectory(prefix="oma-convert-", dir=CACHE.parent) as tmp:
        disk = Path(tmp) / "guest.raw"
        run("cp", "--sparse=always", str(CACHE), str(disk))  # the cache stays as VMware left it
        started = time.perf_counter()
        result = asyncio.run(convert(disk, args.backend_settings, args.timeout))
        took = time.perf_counter() - started
    print("\n".join(result["output"].splitlines()[-15:]))
    print(f"virt-v2v-in-place -i disk (converter plugin, {args.backend_settings or 'kvm'}): "
          f"{took:.0f} s, converted={result['converted']}")


if __name__ == "__main__":
    main()
