"""The web page under load: starts app.py, sends it requests from several users at once, checks every
caption, and prints the server's memory (RSS) before and after.

    python bench_app.py --checkpoint runs/demo/train/best.pt --data-folder runs/demo/data
    python bench_app.py --checkpoint runs/demo/train/best.pt --data-folder runs/demo/data --requests 50 --users 2

Needs the page's requirements (requirements-app.txt). Each request is what a user's click does: caption an
image (the dataset's test images, and every tenth a 4000x3000 photo), show its second word's attention,
and every tenth also make the figure. Linux only (it reads the server's /proc/PID/status).
"""

import argparse
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from app import APP_REQUIREMENTS, Captioner, example_images
from utils import UserError, run_main

REPO = Path(__file__).resolve().parent
BIG_PHOTO_SIDES = (4000, 3000)


def parse_args(argv=None):
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/demo/train/best.pt"),
                        help="a checkpoint written by train.py (default runs/demo/train/best.pt, from make demo)")
    parser.add_argument("--data-folder", type=Path, default=Path("runs/demo/data"),
                        help="its packed dataset: the test images sent (default runs/demo/data)")
    parser.add_argument("--requests", type=int, default=200, help="requests measured after the warm-up (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="requests sent before the first reading (default 20)")
    parser.add_argument("--reading-every", type=int, default=50,
                        help="read the server's RSS after every this many measured requests (default 50)")
    parser.add_argument("--users", type=int, default=4, help="users sending requests at once (default 4)")
    parser.add_argument("--beam-size", type=int, default=3, help="beam size of every request (default 3)")
    args = parser.parse_args(argv)
    if min(args.requests, args.users, args.beam_size, args.reading_every) < 1 or args.warmup < 0:
        parser.error("--requests, --users and --beam-size must be at least 1, --warmup at least 0")
    return args


def free_port():
    """A port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(checkpoint, data_folder=None, timeout_s=180):
    """Run `python app.py --checkpoint ...` on a free port; yields (address, server process)."""
    port = free_port()
    command = [sys.executable, str(REPO / "app.py"), "--checkpoint", str(checkpoint), "--port", str(port)]
    if data_folder is not None:
        command += ["--data-folder", str(data_folder)]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        lines, deadline, match = [], time.monotonic() + timeout_s, None
        for line in process.stdout:  # app.py prints the address once the page is served
            lines.append(line)
            match = re.search(r"open (http://\S+) in a browser", line)
            if match or time.monotonic() > deadline:
                break
        if not match:
            raise RuntimeError("app.py printed no address:\n" + "".join(lines))
        threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # keep the pipe drained
        yield match.group(1), process
    finally:
        process.terminate()
        process.wait(timeout=30)


def rss_mib(pid):
    """(current, peak) resident memory of a process, MiB, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    current = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    return current / 1024, peak / 1024


def request_images(data_folder, folder):
    """The images sent, in turn: the dataset's first 9 test images, then one big photo made from the first."""
    tests = [Path(p) for p in example_images(data_folder, 9)]
    if not tests:
        raise UserError(f"{data_folder}: none of its test images is on disk; run this where make demo ran")
    big = Path(folder) / "big_photo.jpg"
    Image.open(tests[0]).convert("RGB").resize(BIG_PHOTO_SIDES, Image.Resampling.BICUBIC).save(big, quality=90)
    return tests + [big]


def send(clients, images, count, offset, beam_size, expected, desc):
    """`count` requests from the clients (users) at once; returns (seconds per request, wrong answers)."""
    from gradio_client import handle_file

    users = len(clients)
    lock, seconds, wrong = threading.Lock(), [], []
    bar = tqdm(total=count, desc=desc, file=sys.stderr)

    def one(i):
        client, image = clients[i % users], images[(offset + i) % len(images)]
        start = time.perf_counter()
        status, text, *_ = client.predict(handle_file(str(image)), beam_size, 0.0, "argmax", api_name="/caption")
        client.predict(1, api_name="/word")
        if i % 10 == 0:
            client.predict(api_name="/figure")
        with lock:
            seconds.append(time.perf_counter() - start)
            if text != expected[image] or not status.startswith(image.name):
                wrong.append((image.name, text))
            bar.update()

    with ThreadPoolExecutor(max_workers=users) as pool:
        list(pool.map(one, range(count)))
    bar.close()
    return seconds, wrong


def main(argv=None):
    """Start the page, load it, and print what its memory did."""
    args = parse_args(argv)
    try:
        from gradio_client import Client  # installed with Gradio
    except ImportError:
        raise UserError(f"Gradio is not installed; `.venv/bin/pip install -r {APP_REQUIREMENTS}`") from None
    with tempfile.TemporaryDirectory() as folder:
        images = request_images(args.data_folder, folder)
        reference = Captioner(args.checkpoint, torch.device("cpu"))  # the answers, computed here
        expected = {image: reference.caption(image, args.beam_size).caption for image in images}
        with serving(args.checkpoint, args.data_folder) as (address, process):
            start_rss = rss_mib(process.pid)[0]
            # The same users all along: each new client is a session whose state the page keeps for an hour.
            clients = [Client(address, verbose=False) for _ in range(args.users)]
            send(clients, images, args.warmup, 0, args.beam_size, expected, "warm-up")
            before = rss_mib(process.pid)
            seconds, wrong, readings = [], [], []
            for done in range(0, args.requests, args.reading_every):
                count = min(args.reading_every, args.requests - done)
                chunk_seconds, chunk_wrong = send(clients, images, count, args.warmup + done, args.beam_size,
                                                  expected, f"requests {done + 1}-{done + count}")
                seconds, wrong = seconds + chunk_seconds, wrong + chunk_wrong
                readings.append(f"{rss_mib(process.pid)[0]:.0f}")
            after = rss_mib(process.pid)
    print(f"server RSS: {start_rss:.0f} MiB at start, {before[0]:.0f} MiB after {args.warmup} warm-up requests, "
          f"{after[0]:.0f} MiB after {args.requests} more ({after[0] - before[0]:+.0f} MiB); "
          f"peak {after[1]:.0f} MiB")
    print(f"RSS after every {args.reading_every} measured requests (MiB): {', '.join(readings)}")
    print(f"{args.requests} requests from {args.users} users at once: median {statistics.median(seconds):.2f} s "
          f"each (caption + one word, the figure every tenth); wrong captions: {len(wrong)}")
    if wrong:
        raise UserError(f"{len(wrong)} requests got another image's caption, e.g. {wrong[0]}")
    return {"rss_before_mib": before[0], "rss_after_mib": after[0], "peak_mib": after[1], "wrong": len(wrong)}


if __name__ == "__main__":
    run_main(lambda: main(), "bench_app.py")
