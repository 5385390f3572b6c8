"""The job image, built and run: `make image-test` (infra/image-test/run.sh) end to end.

    .venv/bin/pytest -m image tests/test_image_build.py     (or: make image-test)

Builds infra/Dockerfile on a base made offline (debootstrap + the lock's TensorFlow
wheel), then runs infra/image-test/smoke.sh inside the image as uid 1000 with a
read-only root: versions, pip check, the Keras 2 guard, the submitter's --help and
`xfer demo --quick` with its own S3 server. About 6 minutes on 2 cores, so it is marked
`image` as well as `slow` and left out of `make test-all` (CI's run would pass 45
minutes); it needs podman, runc and debootstrap, and root or rootless podman.

Beyond the script's own exit status, this checks what the script promises the host:
nothing left behind (its temporary folder with podman's storage in it, containers,
mounts) and the host's network as it was (no bridge, no firewall rule, no forwarding).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from .deploy import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.image]

RUN = ROOT / "infra" / "image-test" / "run.sh"


def _host_network() -> dict[str, str]:
    """What podman's bridge networking would change: links, forwarding, firewall rules."""
    state = {
        "links": subprocess.run(
            ["ip", "-o", "link", "show"], capture_output=True, text=True
        ).stdout,
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
    }
    # Interface counters change all the time: keep the names and flags only.
    state["links"] = "\n".join(
        sorted(re.sub(r"^\d+: ", "", ln).split(" mtu ")[0] for ln in state["links"].splitlines())
    )
    for tool, args in (("iptables", ["-S"]), ("nft", ["list", "ruleset"])):
        if shutil.which(tool):
            out = subprocess.run([tool, *args], capture_output=True, text=True)
            # Rules, not traffic: packet counters move with every connection.
            state[tool] = re.sub(r"(counter )?packets \d+ bytes \d+", "", out.stdout)
    return state


def _leftovers() -> set[str]:
    tmp = os.environ.get("TMPDIR", tempfile.gettempdir())
    return set(glob.glob(os.path.join(tmp, "xfer-image-test.*")))


def _run_image_test(timeout: float = 3000) -> tuple[int, str]:
    """run.sh in a process group of its own; past the timeout, SIGTERM to the group (the
    script's trap then removes what it made) rather than a kill that leaves it behind."""
    proc = subprocess.Popen(
        [str(RUN)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
        pytest.fail(f"make image-test took over {timeout:.0f}s:\n{out[-4000:]}")
    return proc.returncode, out


@pytest.mark.timeout(3600)
def test_the_image_builds_and_passes_its_smoke_test_leaving_the_host_as_it_was() -> None:
    missing = [t for t in ("podman", "runc", "debootstrap") if not shutil.which(t)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install podman buildah runc debootstrap)")
    containers_dir = Path("/var/lib/containers")
    had_containers_dir = containers_dir.exists()
    network, leftovers = _host_network(), _leftovers()

    returncode, out = _run_image_test()
    assert returncode == 0, out[-6000:]

    # Every step ran, in order, and the smoke test got to its end inside the image.
    steps = re.findall(r"== (\w+):", out)
    assert steps == ["wheelhouse", "os", "base", "image", "smoke"], steps
    for line in (
        "[smoke] runs as xfer (uid 1000)",
        "[smoke] the code tree /opt/xfer is read-only to it",
        "[smoke] pip check: no broken requirements",
        "[smoke] jobs/kuberay_submit.sh --help: usage printed",
        "[smoke] all checks passed",
    ):
        assert line in out, f"missing {line!r}:\n{out[-4000:]}"
    # tf.keras is tf_keras (its module path), version 2.x, without importing xfer first.
    assert re.search(
        r"\[smoke\] Keras 2 guard: TF_USE_LEGACY_KERAS=1, tf\.keras is tf_keras\S* 2\.", out
    )
    # The image says which commit it was built from (XFER_GIT_COMMIT, a build argument).
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    version = re.search(r"\[smoke\] xfer --version: (.*)", out)
    assert version and f"commit {head[:12]}" in version.group(1), out[-4000:]
    # The demo ran end to end in the container: trained, published and scored.
    assert re.search(r"image-test passed in \d+ s; image xfer-job:\S+, \d+ MB", out), out[-2000:]

    # Nothing left behind, and the host's network untouched.
    assert _leftovers() == leftovers, "the temporary folder (podman's storage) was left behind"
    mounts = Path("/proc/self/mounts").read_text()
    assert "xfer-image-test." not in mounts, "a mount of the image test was left behind"
    if not had_containers_dir:
        assert not containers_dir.exists(), f"{containers_dir} was made and left behind"
    assert _host_network() == network, "the host's network changed (links, forwarding, rules)"
