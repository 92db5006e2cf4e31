"""What every script needs: errors a user can fix, devices, images, and files written whole.

Nothing here runs on import, and torch is imported only inside the two device functions:
create_input_files.py needs this module but not torch, whose import alone takes seconds (it would
be most of the start-up of packing a small dataset). Checkpoints and model building are in
checkpoints.py, metrics in metrics.py, the loss in losses.py, the packed-data layout in packed_data.py.
"""

import ctypes
import errno
import functools
import json
import os
import signal
import stat
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

try:
    import simplejpeg  # libjpeg-turbo with scaled decoding; without it every JPEG goes through Pillow
except ImportError:
    simplejpeg = None

# ----------------------------------------------------------------------------------------------
# Errors a user can fix, and devices


class UserError(Exception):
    """A problem with the user's input: the message names the file and what to do."""


def disk_full(exc):
    """The OSError behind `exc` that refused a write for space (a full disk, or a full quota on a shared
    one), or None. It may be `exc` itself or what `exc` was raised from: torch.save reports the failed
    write as a RuntimeError ("unexpected pos ...") raised while handling the OSError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run_main(main_fn, prog):
    """Run a script's main() and turn a UserError, or a write refused for space, into one line on stderr
    and exit code 1.

    Ctrl-C outside training's own handler (which saves a checkpoint first) exits with code 130 and
    one line, not a traceback.
    """
    try:
        return main_fn()
    except UserError as exc:
        raise SystemExit(f"{prog}: error: {exc}") from None
    except Exception as exc:
        full = disk_full(exc)
        if full is None:
            raise
        where = f" writing {full.filename}" if full.filename else ""
        raise SystemExit(f"{prog}: error: the disk filled up{where} ({full.strerror}); free some space and run "
                         "again") from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


def available_devices():
    """The --device values that work on this machine: cpu, and cuda:0..N-1 when CUDA is usable."""
    import torch

    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]


def resolve_device(flag):
    """--device: "auto" is CUDA when present, else the CPU; otherwise cpu, cuda or cuda:N, checked
    against what this machine has (a UserError naming the devices there are, not a driver traceback)."""
    import torch

    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = ", ".join(available_devices())
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise UserError(f"--device {flag}: not a device name; use auto, or a device this machine has: {here}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"--device {flag}: this program runs on cpu or cuda; this machine has: {here}")
    if not torch.cuda.is_available():
        raise UserError(f"--device {flag}: CUDA is not available here (no GPU, or torch built without "
                        f"CUDA); this machine has: {here}")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {flag}: there is no such GPU; this machine has: {here}")
    return device


def keep_freed_memory(device):
    """For work on the CPU: let glibc keep freed memory for reuse instead of returning it at once.

    PyTorch's CPU allocator caches nothing, and glibc hands every block above its mmap threshold
    (at most 32 MiB) back to the system when freed: the next tensor of that size is a fresh mapping
    whose pages fault in, zero-filled, on first touch, and training and decoding allocate such
    tensors at every step. What this gains, and costs in peak RSS (a process keeps what it freed),
    is measured in docs/performance.md.
    Returns False, changing nothing, on other devices or where glibc's mallopt is missing (macOS, musl).
    """
    if device.type != "cpu":
        return False  # the CUDA caching allocator already reuses memory; host memory stays as it was
    mallopt = getattr(glibc(), "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 2**31 - 1))


@functools.cache
def glibc():
    """The C library as ctypes sees it, loaded once; None where there is no libc.so.6 (macOS, musl)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory():
    """Hand the memory glibc holds freed back to the system (malloc_trim), in every thread's arena.

    For a long-running server (app.py): its requests run in a pool of threads, each of which gets a
    glibc arena of its own, and a large image decoded in one of them leaves that arena holding the
    freed pages. Returns False where glibc's malloc_trim is missing (macOS, musl).
    """
    malloc_trim = getattr(glibc(), "malloc_trim", None)
    return malloc_trim is not None and bool(malloc_trim(0))

# ----------------------------------------------------------------------------------------------
# Images

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
EXIF_ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose acts on


def ignore_pillow_warnings():
    """Hide, for the rest of the process, Pillow's warnings about files it decodes fine (odd EXIF data,
    a palette's transparency, a very large photo): packing COCO would print them by the hundred.

    For the main() of a program that decodes images, called before its threads start. Not
    warnings.catch_warnings around each decode: that swaps process-wide state and is not thread-safe,
    and two of the packer's decoding threads leaving it out of order left every warning ignored.
    """
    warnings.filterwarnings("ignore", module=r"PIL\.")


def _to_rgb(image):
    """Any Pillow mode -> RGB: transparency over white, 16/32-bit and float scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        with np.errstate(invalid="ignore"):  # a signalling NaN warns as it is cast (errstate is per thread)
            values = np.asarray(image, dtype=np.float64)
        # A float image may mark missing data with NaN or infinity: black, and the rest scaled as if absent
        # (one such pixel made the peak infinite, and the whole image black).
        values = np.where(np.isfinite(values), values, 0.0)
        peak = values.max() if values.size else 0.0
        # 16-bit data spans 0..65535; 'I' and 'F' have no fixed range, so scale by what is there.
        scale = 255.0 / (65535.0 if image.mode.startswith("I;16") else max(peak, 255.0))
        image = Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path, size):
    """Read an image file as a (3, size, size) uint8 array, squashed to a square as in the tutorial.

    Honours EXIF orientation, accepts any mode, and lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8
    scale when that still leaves about `size` pixels a side (Pillow's draft mode): decoding and
    resizing the full file is most of the packing time. Plain JPEGs are decoded by simplejpeg at the
    scale draft mode picks, which gives the same pixels in less time (tests/test_fast_jpeg.py).

    Raises:
        UserError naming the file when it is missing or cannot be decoded.
    """
    path = Path(path)
    check_image_file(path)
    data = _jpeg_bytes(path) if simplejpeg is not None else b""
    try:
        rgb = _decode_bare_jpeg(data, size)  # (H, W, 3) uint8, or None
        if rgb is not None:
            pixels = _squared(Image.fromarray(rgb), size)
        else:
            with Image.open(path) as image:  # reads the header only
                rgb = _decode_plain_jpeg(data, image, size)
                upright = Image.fromarray(rgb) if rgb is not None else upright_rgb(image, size - size // 8)
                pixels = _squared(upright, size)  # inside the with: Pillow may read the file only now
    except Exception as exc:  # Pillow raises many types for broken files: all mean "unreadable"
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        reason = reason.replace(f" {str(path)!r}", "")  # Pillow repeats the path
        raise UserError(f"{path}: cannot decode image ({reason})") from None
    return pixels  # (3, S, S)


def _squared(image, size):
    """The packing resize rule, in one place: an RGB Pillow image -> (3, size, size) uint8, bicubic."""
    square = image.resize((size, size), Image.Resampling.BICUBIC)
    # Band by band: Pillow hands each band over contiguous, where np.asarray gives (S, S, 3) and
    # only a strided, transposing copy makes it (3, S, S) (docs/packing-speed.md).
    pixels = np.empty((3, size, size), dtype=np.uint8)
    for plane, band in zip(pixels, "RGB"):
        plane[...] = np.frombuffer(square.tobytes("raw", band), dtype=np.uint8).reshape(size, size)
    return pixels


def check_image_file(path):
    """Refuse a path that is not a file, or an empty one, with a UserError naming it.

    One os.stat, not Path.is_file and Path.stat: packing calls this in every decoding thread, and
    pathlib's Python layers hold the GIL that the other threads' decoders wait for.
    """
    try:
        info = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL byte in the name, as Path.is_file treats it
        info = None
    if info is None or not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path}: no such image file")
    if info.st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes), not an image")


def _draft_scale(width, height, size):
    """The s of the 1/s scale (8, 4, 2 or 1) at which Pillow's draft mode decodes a JPEG for `size`.

    A side may come out up to 1/8 short of `size` (COCO's 640x480 decodes at 320x240 for 256) and is
    stretched back by the resize; bench.py measures the difference against a full decode.
    """
    draft_side = size - size // 8
    fits = min(width // draft_side, height // draft_side)
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def upright_rgb(image, draft_side):
    """An open Pillow image -> RGB Pillow image, upright (EXIF orientation applied); a JPEG is decoded in
    draft mode at the smallest libjpeg scale that leaves both sides at least `draft_side` pixels.
    load_image packs through it, caption.py's figure and the page show photos through it."""
    if image.format == "JPEG":
        image.draft("RGB", (draft_side, draft_side))
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose would copy every image
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


# libjpeg-turbo's scale factors just below 1/1, 1/2, 1/4 and 1/8, as (numerator, denominator).
_NEXT_SMALLER_SCALE = {1: (7, 8), 2: (3, 8), 4: (1, 8), 8: None}


def _decode_plain_jpeg(data, image, size):
    """(H, W, 3) uint8 of a plain JPEG (YCbCr or greyscale, upright) decoded by simplejpeg, or None.

    `data` is the file's bytes, `image` the file opened by Pillow. Pillow's draft mode and simplejpeg
    both run libjpeg-turbo; asked for the same 1/s scale with the same (accurate) DCT and upsampling,
    they give the same pixels, but simplejpeg skips Pillow's per-image work in Python and its copies.
    Anything else, and any file libjpeg-turbo warns about, is left to Pillow (None), so that odd
    files decode, or fail, exactly as they always have.
    """
    if (not data or image.format != "JPEG" or image.mode not in ("RGB", "L")
            or image.getexif().get(EXIF_ORIENTATION, 1) != 1):
        return None
    return _decode_at_draft_scale(data, *image.size, size)


def _jpeg_bytes(path):
    """The whole file if it starts as a JPEG does (simplejpeg decodes from memory), else b""."""
    with open(path, "rb") as f:
        if f.read(3) != b"\xff\xd8\xff":
            return b""
        f.seek(0)
        return f.read()


def _header_needs_pillow(data):
    """Whether a JPEG's header, the marker segments before its image data, holds what only Pillow
    acts on: an APP1 segment (EXIF or XMP, where Pillow finds the orientation) or an APP2 MPF
    segment (Pillow opens such a file as MPO, not JPEG, and decodes it whole). A header this walk
    cannot follow also goes to Pillow, which then decodes or refuses the file as it always has."""
    i = 2  # after the start-of-image marker
    while i + 4 <= len(data):
        marker = data[i + 1]
        if data[i] != 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD9:
            return True  # not a marker with a length where the header needs one
        if marker == 0xFF:  # a fill byte before the marker
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the header is over
            return False
        if marker == 0xE1 or (marker == 0xE2 and data[i + 4:i + 8] == b"MPF\x00"):
            return True
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            return True
        i += 2 + length
    return True


def _decode_bare_jpeg(data, size):
    """(H, W, 3) uint8 of a YCbCr or greyscale JPEG with no EXIF, XMP or MPF segment, decoded by
    simplejpeg without Pillow opening the file; None for anything else.

    For such a file Pillow's header parse, in Python and holding the GIL that the other decoding
    threads wait for, would only confirm what libjpeg-turbo's header gives: a JPEG, RGB or L, upright.
    The marker walk reads a few bytes a segment (searching all of a file's bytes for the markers
    cost more than Pillow's parse).
    """
    if not data or _header_needs_pillow(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray"):
        return None  # RGB-coded, CMYK, YCCK: through Pillow, as before
    return _decode_at_draft_scale(data, width, height, size)


def _decode_at_draft_scale(data, width, height, size):
    """(H, W, 3) uint8 of a JPEG of width x height decoded by simplejpeg at the scale Pillow's draft
    mode picks for `size`, or None where simplejpeg would not give draft mode's pixels."""
    s = _draft_scale(width, height, size)
    out_width, out_height = -(-width // s), -(-height // s)  # ceil, as libjpeg scales
    smaller = _NEXT_SMALLER_SCALE[s]
    if smaller and (-(-width * smaller[0] // smaller[1]) >= out_width
                    and -(-height * smaller[0] // smaller[1]) >= out_height):
        return None  # a few pixels a side: simplejpeg would pick the smaller scale, with other pixels
    try:
        rgb = simplejpeg.decode_jpeg(data, "RGB", min_height=out_height, min_width=out_width)
    except ValueError:
        return None
    return rgb if rgb.shape[:2] == (out_height, out_width) else None


def normalize_images(images):
    """uint8 (..., 3, H, W) -> float ImageNet-normalised, on the tensor's device."""
    scaled = images.float() / 255.0
    mean = scaled.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = scaled.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (scaled - mean) / std


def list_images(path):
    """A file -> [file]; a folder -> its image files, sorted. Raises UserError when there are none."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return files
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    return [path]

# ----------------------------------------------------------------------------------------------
# Files written whole or not at all


def atomic_write(path, write_fn, binary=False):
    """Write `path` through `write_fn(file)` into a temporary file beside it, then rename.

    A crash at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the permissions open() would
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj):
    """Atomically write `obj` as indented JSON."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, ensure_ascii=False))


def read_json(path, what):
    """Read a JSON file; a missing or broken file is a UserError naming it and `what` it should be."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (expected {what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); expected {what}") from None
