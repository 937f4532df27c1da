#!/usr/bin/env python3
"""hmacfs beyond one machine: the S3 backend against a reference S3 client, and two nodes
behind nginx against one, in one run.

    .venv/bin/python bench/cluster.py            # full: 1 GiB, 3 rounds, ~4-6 min on 2 cores
    .venv/bin/python bench/cluster.py --quick    # 24 MiB, 1 round, ~15-20 s (tests/test_bench_cluster_smoke.py)

Why: the cluster issue (12) asks for two numbers. (1) hmacfs in front of an S3-compatible
store should add little to moving the bytes: a 1 GiB upload and download through hmacfs
(`[storage] backend = "s3"`, multipart parts of `[uploads] chunksize`, `s3partconcurrency`
at once) against boto3 moving the same bytes to the same server in the same run: ratio =
boto3's time / hmacfs's, target >= 0.9. (2) Nodes share the work: 4 KiB GETs through nginx
with two nodes in the upstream against one, target >= 1.3x on this 2-core machine where wrk
and nginx take their share of the cores.

Strategy: one moto server (tests/support/s3server.py: signature checks on, so every request
of both clients is really signed) and one redis-server (tests/support/redisserver.py), both as
the tests start them; hmacfs nodes from the zipapp (built into the run's temp dir, as the other
benchmarks do) with bench/servers.py's config plus `[storage]` and `[redis]`; one nginx with a
port per upstream set (bench/cluster_setup.py). Each round moves the big file through hmacfs
(bench/clients.py: sendfile PUT to the 201, GET spliced to /dev/null) and through boto3, in
alternating order, then a minimal client's single signed PUT and GET (the ceiling moto allows
one stream), then runs wrk against every arrangement in rotated order: one node direct, nginx
-> one node, nginx -> two nodes, for the S3 backend and for the local backend (two nodes on
one shared directory), and moto itself (the ceiling of what the S3 nodes can get from it).
Every transfer is checked, not just timed: statuses and sizes, the multipart part count of
each object (the configured part size took effect), the sha256 of what comes back (last
round, and a sanity check first), objects and multipart uploads gone after the DELETEs.
Every process is stopped and the temp dir removed at the end, also on failure or timeout.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/support: moto, redis-server as the tests

import clients
import resumable
import run as run_py
import storage
from cluster_setup import (
    Balancer,
    Node,
    Sink,
    children_cpu_seconds,
    raw_get,
    raw_put,
    redis_toml,
    s3_toml,
    signed_headers,
    tree_cpu_seconds,
    wrk,
    wrk_available,
)
from lifecycle import BudgetExceeded, aborted, bench_parser, chosen_plan, handle_signals, stop_all, write_results
from storage import (
    checks_and_notes,
    choose_tmpdir,
    fs_of,
    human,
    loadavg,
    machine_info,
    make_random,
    note_disk,
    rotate,
    samples_section,
    warm_memory,
    warm_section,
    zipapp,
)

from tests.support.redisserver import RedisServer
from tests.support.s3server import MotoS3

BENCH = Path(__file__).resolve().parent
MB = 1e6
BUCKET = "hmacfs-bench"
SMALL = 4096
SMALL_PATH = "small/4k.bin"
HMACFS, BOTO3 = "hmacfs", "boto3"
TWO, ONE, DIRECT = "nginx -> 2 nodes", "nginx -> 1 node", "1 node, no nginx"
TIMEOUT = 600.0


@dataclass(frozen=True)
class Plan:
    """Sizes, rounds and time limit of one run."""

    mode: str
    rounds: int
    big: int  # bytes of every S3 transfer
    part: int  # [uploads] chunksize = boto3's multipart_chunksize
    duration: float  # seconds per wrk run
    budget: float  # hard wall-clock limit, seconds
    concurrency: int = 4  # s3partconcurrency = boto3's max_concurrency
    conns: int = 64
    warm: bool = True

    @property
    def warm_bytes(self) -> int:
        """What moto writes for an upload (the parts, then the object they make) plus slack."""
        return 2 * self.big + self.big // 4 + (64 << 20)


FULL = Plan("full", rounds=3, big=1 << 30, part=16 << 20, duration=4.0, budget=900.0)
QUICK = Plan("quick", rounds=1, big=24 << 20, part=5 << 20, duration=1.0, budget=110.0)


@dataclass(frozen=True)
class Row:
    """One line of the figures table (the fields resumable.ratio_of reads); target None: for information."""

    key: str
    label: str
    unit: str
    measured: str
    against: str
    target: Optional[tuple[str, float]]
    fmt: str = "{:,.0f}"
    ratio_digits: int = 2


def rows(plan: Plan) -> list[Row]:
    big, part = human(plan.big), human(plan.part)
    how = f"{part} parts, {plan.concurrency} at once"
    return [
        Row("up", f"{big} upload to S3 (moto): hmacfs vs boto3 upload_file ({how})", "MB/s", HMACFS, BOTO3,
            (">=", 0.9)),
        Row("down", f"{big} download from S3 (moto): hmacfs vs boto3 download_fileobj (one GET each)", "MB/s",
            HMACFS, BOTO3, (">=", 0.9)),
        Row("get_s3", f"4 KiB GET @{plan.conns}, S3 backend + Redis: two nodes vs one, behind nginx", "req/s",
            TWO, ONE, (">=", 1.3)),
        Row("get_local", f"4 KiB GET @{plan.conns}, local backend (a copy of the file on each node's disk) + "
            "Redis: two nodes vs one, behind nginx (for comparison: a cluster needs the S3 backend)", "req/s",
            TWO, ONE, None),
        Row("get_s3", f"4 KiB GET @{plan.conns}, S3 backend + Redis: nginx -> 1 node vs that node without nginx",
            "req/s", ONE, DIRECT, None),
        Row("get_local", f"4 KiB GET @{plan.conns}, local backend + Redis: nginx -> 1 node vs that node without "
            "nginx", "req/s", ONE, DIRECT, None),
    ]


class Cluster:
    """Everything started for the run; `stop` ends it all (each part may be missing)."""

    def __init__(self) -> None:
        self.moto: Optional[MotoS3] = None
        self.redis: Optional[RedisServer] = None
        self.nodes: dict[str, Node] = {}  # s3-a, s3-b, local-a, local-b
        self.lb: Optional[Balancer] = None

    def servers(self) -> list:
        return [*self.nodes.values(), self.lb]

    def stop(self) -> None:
        stop_all(self.lb, *self.nodes.values())
        for proc in (self.redis, self.moto):
            if proc is not None:
                try:
                    proc.stop()
                except Exception as exc:  # cleanup must go on
                    print(f"bench: cleanup: {exc}", file=sys.stderr)

    def log_tails(self) -> None:
        if self.moto is not None:
            try:
                print(f"--- moto log tail ---\n{(self.moto.workdir / 'moto.log').read_text()[-2000:]}",
                      file=sys.stderr)
            except OSError:
                pass


def start(run: storage.Run, cl: Cluster, root: Path, pyz: Path, python: str) -> None:
    plan: Plan = run.plan  # type: ignore[assignment]
    # moto keeps every object above ~5 MiB in a temp file (SpooledTemporaryFile): on tmpfs here, not /tmp's disk
    spool = root / "moto-spool"
    spool.mkdir()
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(spool)
    try:
        cl.moto = MotoS3(root / "moto", bucket=BUCKET).start(timeout=60)
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before
    cl.redis = RedisServer(root / "redis").start()
    m = cl.moto
    s3 = s3_toml(m.endpoint, m.bucket, m.access_key, m.secret_key, plan.concurrency)
    for name in ("s3-a", "s3-b"):
        cl.nodes[name] = Node(name, root / name, pyz, python, plan.part, s3 + redis_toml(cl.redis.port, "s3:"))
    for name in ("local-a", "local-b"):
        cl.nodes[name] = Node(name, root / name, pyz, python, plan.part, redis_toml(cl.redis.port, "local:"))
    for n in list(cl.nodes.values()):
        try:
            print(f"  {n.name} ready in {n.start() * 1000:.0f} ms", flush=True)
        except RuntimeError as e:
            if not n.name.startswith("local-"):
                raise
            # the second cluster is a reference: without it the S3 figures still stand
            tail = [line for line in str(e).splitlines() if line.strip()][-1]
            run.fail(f"the local-backend cluster did not start ({n.name}: {tail}); its rows are n/a")
            for name in ("local-a", "local-b"):
                stop_all(cl.nodes.pop(name, None))
            break
    nd = cl.nodes
    sets = {"s3-1": [nd["s3-a"]], "s3-2": [nd["s3-a"], nd["s3-b"]]}
    if "local-b" in nd:
        sets.update({"local-1": [nd["local-a"]], "local-2": [nd["local-a"], nd["local-b"]]})
    cl.lb = Balancer(root / "nginx", sets)
    print(f"  nginx ready in {cl.lb.start() * 1000:.0f} ms (ports {cl.lb.ports})", flush=True)


# ----------------------------------------------------------------------------- S3 helpers


def transfer_config(plan: Plan, single: bool = False):
    from boto3.s3.transfer import TransferConfig

    threshold = plan.big * 4 + 1 if single else plan.part
    return TransferConfig(multipart_threshold=threshold, multipart_chunksize=plan.part,
                          max_concurrency=plan.concurrency, use_threads=True)


def objects(s3, prefix: str = "") -> dict[str, tuple[int, str]]:
    """Key -> (size, ETag) of every object in the bucket under `prefix`."""
    out: dict[str, tuple[int, str]] = {}
    token: dict[str, str] = {}
    while True:
        page = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **token)
        for o in page.get("Contents", []):
            out[o["Key"]] = (o["Size"], o["ETag"].strip('"'))
        if not page.get("IsTruncated"):
            return out
        token = {"ContinuationToken": page["NextContinuationToken"]}


def parts_of(etag: str) -> int:
    """Parts of a multipart object from its ETag (`<md5>-<parts>`); 1 for a single PUT."""
    m = re.fullmatch(r"[0-9a-f]{32}-(\d+)", etag)
    return int(m.group(1)) if m else 1


def object_sha256(s3, key: str) -> str:
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"]
    digest = hashlib.sha256()
    for block in body.iter_chunks(1 << 20):
        digest.update(block)
    return digest.hexdigest()


def gone(s3, key: str, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while key in objects(s3, key):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# ----------------------------------------------------------------------------- phase 1: S3 transfers


def via_hmacfs(run: storage.Run, r: int, node: Node, s3, src: Path, want: str, check_sha: bool) -> None:
    """PUT then GET of the big file through one node; checks the object it made in the bucket."""
    plan: Plan = run.plan  # type: ignore[assignment]
    path = f"big/r{r}.bin"
    if plan.warm:
        run.add("warm_s", HMACFS, warm_memory(plan.warm_bytes))
    before = objects(s3, "object.")
    cpu0 = tree_cpu_seconds(node.proc.pid)
    up = clients.put_file(node.port, storage.target(path, plan.big), src, timeout=TIMEOUT)
    cpu_up = tree_cpu_seconds(node.proc.pid) - cpu0
    if up.status != 201:
        run.fail(f"r{r} hmacfs PUT answered {up.status}: {node.log_tail(600)}")
        return
    new = {k: v for k, v in objects(s3, "object.").items() if k not in before}
    want_parts = math.ceil(plan.big / plan.part)
    if len(new) != 1 or [(size, parts_of(etag)) for size, etag in new.values()] != [(plan.big, want_parts)]:
        run.fail(f"r{r} hmacfs PUT: new objects in the bucket {new} instead of one of {plan.big:,} B "
                 f"in {want_parts} parts")
        return
    key = next(iter(new))
    cpu0 = tree_cpu_seconds(node.proc.pid)
    down = clients.get_file(node.port, "/upload/" + path, timeout=TIMEOUT)
    cpu_down = tree_cpu_seconds(node.proc.pid) - cpu0
    if down.status != 200 or down.nbytes != plan.big:
        run.fail(f"r{r} hmacfs GET answered {down.status} with {down.nbytes:,} of {plan.big:,} B")
        return
    run.add("up", HMACFS, up.mb_per_s)
    run.add("down", HMACFS, down.mb_per_s)
    run.add("parts", "hmacfs cpu s, upload", cpu_up)
    run.add("parts", "hmacfs cpu s, download", cpu_down)
    print(f"  r{r} hmacfs  up {up.mb_per_s:6,.0f} MB/s ({up.seconds:5.2f} s, node CPU {cpu_up:.2f} s), "
          f"down {down.mb_per_s:6,.0f} MB/s ({down.seconds:5.2f} s, node CPU {cpu_down:.2f} s)", flush=True)
    if check_sha:
        status, got = storage.get_sha256(node.port, path, timeout=TIMEOUT)
        if status != 200 or got != want or object_sha256(s3, key) != want:
            run.fail(f"r{r} hmacfs: the file read back (GET {status}) or its object has another sha256")
    status = storage.delete(node.port, path)
    if status != 204 or not gone(s3, key):
        run.fail(f"r{r} hmacfs DELETE answered {status}; object {key} still in the bucket: {not gone(s3, key, 0)}")


def via_boto3(run: storage.Run, r: int, s3, src: Path, want: str, check_sha: bool) -> None:
    """upload_file then download_fileobj (into a Sink) of the big file; checks the object."""
    plan: Plan = run.plan  # type: ignore[assignment]
    key = f"boto3-r{r}.bin"
    if plan.warm:
        run.add("warm_s", BOTO3, warm_memory(plan.warm_bytes))
    t0 = time.perf_counter()
    s3.upload_file(str(src), BUCKET, key, Config=transfer_config(plan))
    t_up = time.perf_counter() - t0
    head = s3.head_object(Bucket=BUCKET, Key=key)
    want_parts = math.ceil(plan.big / plan.part)
    if head["ContentLength"] != plan.big or parts_of(head["ETag"].strip('"')) != want_parts:
        run.fail(f"r{r} boto3 upload: object of {head['ContentLength']:,} B, ETag {head['ETag']} "
                 f"(want {plan.big:,} B in {want_parts} parts)")
        return
    sink = Sink()
    t0 = time.perf_counter()
    s3.download_fileobj(BUCKET, key, sink, Config=transfer_config(plan, single=True))
    t_down = time.perf_counter() - t0
    problem = sink.problem(plan.big)
    if problem:
        run.fail(f"r{r} boto3 download: {problem}")
        return
    run.add("up", BOTO3, plan.big / t_up / MB)
    run.add("down", BOTO3, plan.big / t_down / MB)
    print(f"  r{r} boto3   up {plan.big / t_up / MB:6,.0f} MB/s ({t_up:5.2f} s), "
          f"down {plan.big / t_down / MB:6,.0f} MB/s ({t_down:5.2f} s)", flush=True)
    if check_sha and object_sha256(s3, key) != want:
        run.fail(f"r{r} boto3: the object read back has another sha256")
    s3.delete_object(Bucket=BUCKET, Key=key)


def ceiling(run: storage.Run, r: int, moto: MotoS3, src: Path) -> None:
    """One signed PUT of the whole file (sendfile body) and one GET of it (spliced to /dev/null)."""
    plan: Plan = run.plan  # type: ignore[assignment]
    path = f"/{BUCKET}/raw-r{r}.bin"
    if plan.warm:
        run.add("warm_s", "raw", warm_memory(plan.warm_bytes))
    sign = (moto.endpoint, moto.region, moto.access_key, moto.secret_key)
    up = raw_put(moto.port, path, signed_headers(*sign, "PUT", path), src, TIMEOUT)
    down = raw_get(moto.port, path, signed_headers(*sign, "GET", path), TIMEOUT)
    if up.status != 200 or down.status != 200 or down.nbytes != plan.big:
        run.fail(f"r{r} raw client: PUT {up.status}, GET {down.status} with {down.nbytes:,} B")
    else:
        run.add("ceiling", "single PUT", up.mb_per_s)
        run.add("ceiling", "single GET", down.mb_per_s)
        print(f"  r{r} raw     up {up.mb_per_s:6,.0f} MB/s, down {down.mb_per_s:6,.0f} MB/s (one request each)",
              flush=True)
    moto.s3().delete_object(Bucket=BUCKET, Key=path.rsplit("/", 1)[1])


# ----------------------------------------------------------------------------- phase 2: 4 KiB GETs


def targets(cl: Cluster) -> list[tuple[str, str, int, tuple[str, ...]]]:
    """(sample set, series, port, headers) of every wrk arrangement."""
    assert cl.lb is not None and cl.moto is not None
    lb, m = cl.lb.ports, cl.moto
    key = f"/{BUCKET}/{SMALL_PATH.replace('/', '-')}"
    moto_headers = tuple(f"{k}: {v}" for k, v in
                         signed_headers(m.endpoint, m.region, m.access_key, m.secret_key, "GET", key).items())
    out = [("get_s3", DIRECT, cl.nodes["s3-a"].port, ()), ("get_s3", ONE, lb["s3-1"], ()),
           ("get_s3", TWO, lb["s3-2"], ())]
    if "local-2" in lb:
        out += [("get_local", DIRECT, cl.nodes["local-a"].port, ()), ("get_local", ONE, lb["local-1"], ()),
                ("get_local", TWO, lb["local-2"], ())]
    return [*out, ("ceiling_get", "moto", m.port, moto_headers)]


def cpu_now(cl: Cluster) -> dict[str, float]:
    procs = {n.name: n.proc for n in cl.nodes.values()}
    procs.update(nginx=cl.lb.proc if cl.lb else None, redis=cl.redis.proc if cl.redis else None,
                 moto=cl.moto.proc if cl.moto else None)
    out = {name: tree_cpu_seconds(p.pid if p else None) for name, p in procs.items()}
    out["wrk"] = children_cpu_seconds()
    return out


def phase_gets(run: storage.Run, r: int, cl: Cluster) -> None:
    plan: Plan = run.plan  # type: ignore[assignment]
    for key, series, port, headers in rotate(targets(cl), r):
        target = f"/{BUCKET}/{SMALL_PATH.replace('/', '-')}" if key == "ceiling_get" else "/upload/" + SMALL_PATH
        before = cpu_now(cl)
        summary = wrk(port, target, plan.conns, plan.duration, headers)
        seconds = summary["duration_us"] / 1e6
        after = cpu_now(cl)
        problem = run_py.wrk_problem(summary)
        if problem:
            run.fail(f"r{r} {key} {series}: {problem}")
            continue
        run.add(key, series, summary["rps"])
        busy = {name: (after[name] - before[name]) / seconds for name in after}
        for name, cores in busy.items():
            run.add("cpu", f"{key} / {series} / {name}", cores)
        shown = ", ".join(f"{k} {v:.2f}" for k, v in busy.items() if v >= 0.05)
        print(f"  r{r} {key:9s} {series:17s} {summary['rps']:8,.0f} req/s  p99 {summary['p99_us'] / 1000:6.1f} ms"
              f"  cores: {shown}", flush=True)


# ----------------------------------------------------------------------------- checks


def sanity_check(run: storage.Run, cl: Cluster, root: Path) -> None:
    """Untimed, before the rounds: moto refuses a bad signature; an odd-sized multipart file goes
    through hmacfs and boto3 and comes back with its sha256 (also read straight from hmacfs's
    object); the 4 KiB file is uploaded on one node of each cluster and read through every node
    and every nginx port with its sha256 (so the other node found it through Redis)."""
    from botocore.exceptions import ClientError

    plan: Plan = run.plan  # type: ignore[assignment]
    m = cl.moto
    assert m is not None and cl.lb is not None
    s3 = m.s3()
    try:
        m.boto3_client("s3", m.access_key, "not-the-secret").head_bucket(Bucket=BUCKET)
        raise RuntimeError("sanity check: moto accepted a request signed with a wrong secret")
    except ClientError as e:
        if e.response["ResponseMetadata"]["HTTPStatusCode"] != 403:
            raise
    size = 2 * plan.part + 12_345
    odd = make_random(root / "odd.bin", size)
    want = resumable.file_sha256(odd)
    node = cl.nodes["s3-a"]
    before = objects(s3, "object.")
    res = clients.put_file(node.port, storage.target("check/odd.bin", size), odd, timeout=120)
    new = {k: v for k, v in objects(s3, "object.").items() if k not in before}
    if res.status != 201 or [(s, parts_of(e)) for s, e in new.values()] != [(size, 3)]:
        raise RuntimeError(f"sanity check: hmacfs PUT {res.status}, new objects {new} (want one of {size:,} B, "
                           "3 parts)")
    for n in (node, cl.nodes["s3-b"]):
        status, got = storage.get_sha256(n.port, "check/odd.bin", timeout=120)
        if status != 200 or got != want:
            raise RuntimeError(f"sanity check: GET from {n.name}: {status}, sha256 {got[:12]}, want {want[:12]}")
    if object_sha256(s3, next(iter(new))) != want:
        raise RuntimeError("sanity check: hmacfs's object in the bucket is not the uploaded bytes")
    s3.upload_file(str(odd), BUCKET, "check-odd.bin", Config=transfer_config(plan))
    sink = Sink()
    s3.download_fileobj(BUCKET, "check-odd.bin", sink, Config=transfer_config(plan, single=True))
    if sink.problem(size) or object_sha256(s3, "check-odd.bin") != want:
        raise RuntimeError(f"sanity check: boto3 round trip: {sink.problem(size) or 'another sha256'}")
    s3.delete_object(Bucket=BUCKET, Key="check-odd.bin")
    if storage.delete(node.port, "check/odd.bin") != 204:
        raise RuntimeError("sanity check: DELETE through hmacfs failed")

    small = make_random(root / "small.bin", SMALL)
    want = resumable.file_sha256(small)
    for first in [n for n in ("s3-a", "local-a") if n in cl.nodes]:
        res = clients.put_file(cl.nodes[first].port, storage.target(SMALL_PATH, SMALL), small, timeout=60)
        if res.status != 201:
            raise RuntimeError(f"sanity check: 4 KiB PUT to {first}: {res.status}")
    if "local-b" in cl.nodes:  # hmacfs refuses a storage directory another node uses: a replica instead
        replica = cl.nodes["local-b"].data / SMALL_PATH
        replica.parent.mkdir(parents=True, exist_ok=True)
        # with its mtime: the shared row names size and mtime, and a copy that differed would be
        # re-hashed and its row rewritten by each node in turn
        shutil.copy2(cl.nodes["local-a"].data / SMALL_PATH, replica)
    ports = {n.name: n.port for n in cl.nodes.values()} | {f"nginx {k}": v for k, v in cl.lb.ports.items()}
    for name, port in ports.items():
        for _ in range(2):  # two nodes behind nginx: round robin, both answer
            status, got = storage.get_sha256(port, SMALL_PATH, timeout=60)
            if status != 200 or got != want:
                raise RuntimeError(f"sanity check: 4 KiB GET through {name}: {status}, sha256 {got[:12]}")
    s3.upload_file(str(small), BUCKET, SMALL_PATH.replace("/", "-"))  # moto's own ceiling reads this one
    run.checks += [
        "moto runs with request authentication on: a request signed with a wrong secret gets 403; every request "
        "of hmacfs, boto3 and the raw client was signed (SigV4) and accepted",
        f"a {size:,} B random file: PUT through node s3-a makes exactly one new object, of that size, in 3 "
        f"parts (ETag `-3`: the {human(plan.part)} part size took effect); GET through s3-a and through s3-b "
        "(which never saw the upload: metadata from Redis) and the object read straight from the bucket all "
        "have the source's sha256; boto3's upload_file/download_fileobj round trip too; the DELETE is a 204",
        "the 4 KiB file, uploaded once on s3-a and once on local-a (and copied into local-b's directory), is "
        "read with the right sha256 through every node and every nginx port (twice each, so both members of "
        "a two-node upstream answer)",
        f"every round: hmacfs's PUT is a 201 and makes exactly one object of {human(plan.big)} in "
        f"{math.ceil(plan.big / plan.part)} parts; its GET is a 200 with every byte; boto3's object has the "
        "same size and part count, its download wrote every byte exactly once; the raw client's PUT and GET "
        "are 200 with every byte; each object is gone from the bucket after its DELETE; on the last round the "
        "sha256 of hmacfs's GET, of hmacfs's object and of boto3's object equal the source's",
        "every wrk sample: fewer than 0.1% errors or non-2xx answers (bench/run.py's rule)",
        "after the rounds: no unfinished multipart upload left in the bucket",
    ]


# ----------------------------------------------------------------------------- report


def table(run: storage.Run) -> str:
    lines = ["| metric | unit | measured | against | ratio | per-round ratios | target |",
             "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for row in rows(run.plan):  # type: ignore[arg-type]
        m, a, ratio, per = resumable.ratio_of(row, run)  # type: ignore[arg-type]
        d = row.ratio_digits
        target = "-" if row.target is None else resumable.verdict(row, ratio)  # type: ignore[arg-type]
        lines.append(f"| {row.label} | {row.unit} | {row.measured} {'n/a' if m is None else row.fmt.format(m)} | "
                     f"{row.against} {'n/a' if a is None else row.fmt.format(a)} | "
                     f"{'n/a' if ratio is None else f'{ratio:.{d}f}x'} | "
                     f"{' '.join(f'{x:.{d}f}' for x in per) or 'n/a'} | {target} |")
    return "\n".join(lines)


def _med(values: list[float], fmt: str) -> str:
    return fmt.format(statistics.median(values)) if values else "n/a"


def ceiling_table(run: storage.Run) -> list[str]:
    plan: Plan = run.plan  # type: ignore[assignment]
    big = human(plan.big)
    return ["| what | median | samples |", "| --- | ---: | --- |",
            *(f"| {label} | {_med(run.get(key, name), '{:,.0f}')} {unit} | "
              + ", ".join(f"{v:,.0f}" for v in run.get(key, name)) + " |"
              for label, key, name, unit in (
                  (f"{big} single signed PUT to moto (raw socket, sendfile body)", "ceiling", "single PUT", "MB/s"),
                  (f"{big} single signed GET from moto (raw socket, splice to /dev/null)", "ceiling", "single GET",
                   "MB/s"),
                  (f"4 KiB GET @{plan.conns} straight from moto (wrk, one signed request replayed)", "ceiling_get",
                   "moto", "req/s")))]


def cpu_table(run: storage.Run) -> list[str]:
    """Cores busy per process during each wrk arrangement (medians over the rounds)."""
    cpu = run.samples.get("cpu", {})
    procs = ["s3-a", "s3-b", "local-a", "local-b", "nginx", "redis", "moto", "wrk"]
    out = ["| arrangement | req/s | " + " | ".join(procs) + " | sum |", "| --- | ---: |" + " ---: |" * (len(procs) + 1)]
    for key, series in (("get_s3", DIRECT), ("get_s3", ONE), ("get_s3", TWO), ("get_local", DIRECT),
                        ("get_local", ONE), ("get_local", TWO), ("ceiling_get", "moto")):
        cells = [statistics.median(cpu[f"{key} / {series} / {p}"]) if cpu.get(f"{key} / {series} / {p}") else None
                 for p in procs]
        shown = " | ".join("n/a" if c is None else f"{c:.2f}" for c in cells)
        total = sum(c for c in cells if c is not None)
        label = "moto alone (ceiling)" if key == "ceiling_get" else f"{key.replace('get_', '')}: {series}"
        out.append(f"| {label} | "
                   f"{_med(run.get(key, series), '{:,.0f}')} | {shown} | {total:.2f} |")
    return out


def report(run: storage.Run, info: dict[str, str], wall: float, loads: tuple[str, str], fs: str,
           context: str) -> str:
    plan: Plan = run.plan  # type: ignore[assignment]
    busy = max(float(x.split()[0]) if x != "?" else 0.0 for x in loads) >= 0.5
    big = human(plan.big)
    out = ["# hmacfs cluster benchmark results", "",
           f"Written by `.venv/bin/python bench/cluster.py{' --quick' if plan.mode == 'quick' else ''}"
           f"{'' if plan.big in (FULL.big, QUICK.big) else f' --size {plan.big}'}`; see `bench/README.md` "
           "(\"Cluster\").", "",
           f"- date: {info['date']}", f"- commit: {info['commit']}",
           f"- zipapp: {info.get('pyz', '?')}, run by {info['python_path']} (it has redis-py)",
           f"- machine: {info['cpu']}",
           f"- kernel: {info['kernel']}", f"- Python: {info['python']}",
           f"- S3 server: moto {info.get('moto', '?')} server mode (werkzeug, threaded), request authentication on "
           "(tests/support/s3server.py); objects above ~5 MiB spooled to temp files in the run's temp dir; "
           f"reference client boto3 {info.get('boto3', '?')}",
           f"- Redis: {info.get('redis', '?')} (tests/support/redisserver.py: no persistence); nginx: "
           f"{info.get('nginx', '?')}, 1 worker, round robin, keepalive 64 to the upstreams; wrk 2 threads",
           f"- load average (1/5/15 min) at start: {loads[0]}; at end: {loads[1]}",
           "- other processes: " + ("were running (load average >= 0.5): figures are from a shared machine"
                                    if busy else "none significant (load average < 0.5)")
           + (f"; {context}" if context else ""),
           f"- mode: {plan.mode}, {plan.rounds} round(s): {big} through hmacfs and through boto3 (order "
           f"alternating), the raw client, then wrk {plan.duration:g} s per arrangement (rotated); wall time "
           f"{wall:.0f} s",
           f"- storage: {fs}; source file, moto's objects, the nodes' data dirs there",
           f"- nodes: bench/servers.py's hmacfs config + `[uploads] chunksize = {plan.part}` ({human(plan.part)}) + "
           f"`[redis]` (one redis-server, key prefix per cluster); S3 nodes: `[storage] backend = \"s3\"`, "
           f"`s3partconcurrency = {plan.concurrency}`, one bucket; local nodes: the local backend, each its own "
           "directory, the 4 KiB file copied into the second one (hmacfs refuses a storage directory another "
           "process uses); dedup, encryption, `s3redirect`: off",
           "- RAM warmed before every timed upload: "
           + (f"yes, {human(plan.warm_bytes)} faulted in and freed just before (storage.warm_memory)"
              if plan.warm else "no (--no-warm)"), "",
           "## Figures", "", table(run), "",
           "Transfers: MB/s = 10^6 bytes / s. hmacfs: bench/clients.py's sendfile PUT, from connect to the 201 "
           "(the node streams the body into a multipart upload as it arrives, so this holds the last part and "
           "CompleteMultipartUpload), and its GET spliced to /dev/null (the node reads the object with one "
           "GET and streams it). boto3: `upload_file` with TransferConfig(multipart_threshold = "
           f"multipart_chunksize = {human(plan.part)}, max_concurrency = {plan.concurrency}) from the same source "
           "file, and `download_fileobj` as one GET (multipart_threshold above the size) into a seekable sink "
           "that keeps nothing; both sign each part's payload with its sha256 over http, as hmacfs does. "
           "ratio = hmacfs MB/s / boto3 MB/s = boto3's time / hmacfs's time. 4 KiB GETs: `wrk -t2 -c"
           f"{plan.conns} -d{plan.duration:g}s` on one file, keep-alive; ratio two nodes / one node, both behind "
           "the same nginx. Medians over the rounds; per-round ratios pair the samples of one round.", "",
           "## Ceilings: what moto allows", "", *ceiling_table(run), "",
           "moto keeps objects in temp files and is written in Python: it, not the clients, sets the pace of "
           "every transfer here, for boto3 and hmacfs alike (both talk to the same server in the same run). "
           "The single PUT is what one stream can push into it without multipart; for a multipart upload moto "
           "also copies every part into the final object. A ranged GET makes moto read the whole object and "
           "slice it, so a download in ranged parts costs it (parts x size): that is why boto3 downloads with "
           "one GET here, like hmacfs, and not with download_file's ranged parts.", "",
           "## Where the CPU goes during the 4 KiB GETs (cores busy, medians)", "", *cpu_table(run), "",
           "Cores busy = CPU seconds of the process (and its children) / the wrk run's duration; the machine "
           f"has {os.cpu_count()}. Each hmacfs GET in cluster mode reads the file's row from Redis (no row cache "
           "shared across nodes), and on the S3 backend streams the object from moto (no `s3redirect`), so moto "
           "serves one small GET per hmacfs GET; the local-backend nodes read the file from their own disk "
           "instead (sendfile), with the row from the same Redis.", ""]
    out += warm_section(run, "## RAM warm-up before the timed uploads",
                        "Seconds per GiB to fault in and free the warm-up memory, per series, in order of rounds "
                        "(~1 s/GiB: warm RAM; 1.5-3.5 s/GiB: this VM's RAM had gone cold).")
    out += samples_section(run.samples)
    out += checks_and_notes(run)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- main


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(|B|KiB|MiB|GiB)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError("a size such as 256MiB, 1GiB or a number of bytes")
    return int(m.group(1)) * {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = bench_parser("hmacfs: S3 backend vs boto3, two nodes vs one (see bench/README.md)",
                      "24 MiB, 1 round, 1 s wrk runs, ~15-20 s", BENCH / "cluster-results.md",
                      python_help="interpreter that runs hmacfs (needs redis-py)")
    ap.add_argument("--size", type=parse_size, help="bytes of the S3 transfers (default 1GiB; quick 24MiB)")
    ap.add_argument("--duration", type=float, help="seconds per wrk run (default 4; quick 1)")
    return ap.parse_args(argv)


def versions(info: dict[str, str], python: str) -> None:
    import boto3
    import moto

    info["boto3"], info["moto"] = boto3.__version__, moto.__version__
    info["redis"] = storage._cmd(["redis-server", "--version"]).split(" sha=")[0]
    info["nginx"] = storage._cmd(["nginx", "-v"]).replace("nginx version: ", "")
    info["python_path"] = python


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; exit 0 when every sample was valid, 1 when some failed, 2 on abort."""
    args = parse_args(argv)
    plan = chosen_plan(args, QUICK, FULL, big=args.size, duration=args.duration)
    try:
        import boto3  # noqa: F401 - test-only: the reference client
        import moto  # noqa: F401
    except ImportError as e:
        print(f"bench: {e.name} not installed: run with .venv/bin/python (pip install -e '.[test]')", file=sys.stderr)
        return 2
    if not wrk_available() or shutil.which("redis-server") is None:
        print("bench: needs nginx, wrk and redis-server on PATH (Debian: nginx-light wrk redis-server)",
              file=sys.stderr)
        return 2
    # source + moto's parts and object + boto3's copy + the raw client's + warm-up ballast
    need = 4 * plan.big + plan.warm_bytes + (512 << 20)
    if storage.free_bytes(Path("/dev/shm")) < need and args.tmpdir is None:
        print(f"bench: {human(plan.big)} needs about {need / 2**30:.1f} GiB of free RAM (moto keeps the objects); "
              "try --size 256MiB", file=sys.stderr)
    handle_signals(plan.budget)
    started = time.perf_counter()
    load_start = loadavg()
    info = machine_info(args.python)
    versions(info, args.python)
    tmpdir = choose_tmpdir(args.tmpdir, need)
    signal.alarm(int(plan.budget))
    root = Path(tempfile.mkdtemp(prefix="hmacfs-bench-cluster-", dir=tmpdir))
    run = storage.Run(plan, root)  # type: ignore[arg-type]  # this benchmark's plan (same duck type)
    note_disk(run, tmpdir, root)
    cl = Cluster()
    try:
        pyz, info["pyz"] = zipapp(args.pyz, args.python, root)
        print(f"bench: {plan.mode} mode, {plan.rounds} round(s) of {human(plan.big)} in {human(plan.part)} parts, "
              f"wrk {plan.duration:g} s, temp dir {root}, load {load_start}", flush=True)
        start(run, cl, root, pyz, args.python)
        assert cl.moto is not None
        s3 = cl.moto.s3()
        sanity_check(run, cl, root)
        src = make_random(root / "source.bin", plan.big)
        want = resumable.file_sha256(src)
        for r in range(plan.rounds):
            print(f"== round {r + 1}/{plan.rounds}", flush=True)
            last = r == plan.rounds - 1
            for side in rotate([HMACFS, BOTO3], r):
                if side == HMACFS:
                    via_hmacfs(run, r, cl.nodes["s3-a"], s3, src, want, last)
                else:
                    via_boto3(run, r, s3, src, want, last)
            ceiling(run, r, cl.moto, src)
            phase_gets(run, r, cl)
        left = s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
        if left:
            run.fail(f"unfinished multipart uploads left in the bucket: {[u['Key'] for u in left]}")
        signal.alarm(0)
    except (BudgetExceeded, KeyboardInterrupt, SystemExit, Exception) as exc:
        cl.log_tails()
        return aborted(exc, *cl.servers(), show_traceback=True)
    finally:
        cl.stop()
        shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - started
    text = report(run, info, wall, (load_start, loadavg()), fs_of(root), args.context)
    return write_results(args.out, text, table(run), wall, run.failures)


if __name__ == "__main__":
    sys.exit(main())
