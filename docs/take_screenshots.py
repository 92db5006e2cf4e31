"""The screenshots of docs/what-users-see.md: the page in headless Chromium with each photo uploaded
(its second word clicked), and caption.py's figure of the same photo.

    .venv-app/bin/python docs/take_screenshots.py --checkpoint runs/demo/train/best.pt \
        --photos rocket_portrait.jpg coffee.png --out docs/img --tag after

Needs the page's requirements (make app-install) and Debian's chromium. The photos behind docs/img are
scikit-image's sample photos coffee.png (landscape) and rocket.jpg cut to a 9:16 portrait around the
rocket, taken from its wheel (`pip download scikit-image --no-deps`, then unzip skimage/data/).
"""
import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import bench_app  # noqa: E402  (after the path is set)
from test_app import CHROMIUM, CHROMIUM_FLAGS  # noqa: E402


def parse_args(argv=None):
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/demo/train/best.pt"),
                        help="the model the page serves (default runs/demo/train/best.pt, from make demo)")
    parser.add_argument("--photos", type=Path, nargs="+", required=True, help="the photos to upload")
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="where the JPEGs go (default docs/img)")
    parser.add_argument("--tag", default="after", help="suffix of the file names, e.g. before or after (default after)")
    return parser.parse_args(argv)


def main(argv=None):
    """Serve the page, upload each photo, screenshot it; then write caption.py's figure of each."""
    from playwright.sync_api import expect, sync_playwright

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with bench_app.serving(args.checkpoint) as (address, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for photo in args.photos:
            page.goto(address)
            page.locator("#upload input[type=file]").set_input_files(str(photo))
            expect(page.locator("#caption textarea")).not_to_have_value("", timeout=120_000)
            page.locator("#words label").nth(1).click()
            expect(page.locator("#word-label")).to_contain_text("word 2 of", timeout=30_000)
            page.wait_for_timeout(1500)  # the new view's image to load
            page.screenshot(path=str(args.out / f"page_{photo.stem}_{args.tag}.jpg"), full_page=True, quality=85)
        browser.close()
    for photo in args.photos:
        subprocess.run([sys.executable, str(REPO / "caption.py"), "--img", str(photo), "--checkpoint",
                        str(args.checkpoint), "--out", str(args.out / f"figure_{photo.stem}_{args.tag}.jpg")],
                       check=True)


if __name__ == "__main__":
    main()
