"""Measures what the dataset report's leak thresholds rest on, on the demo's manifests:
perceptual-hash distance and 64x64 pixel correlation between distinct photos, and between a photo
and its resized, re-encoded copies.

    python benchmarks/leak_thresholds.py [DEMO_DATASET_DIR]   # default: builds the demo dataset in a temp folder
"""

import glob
import itertools
import os
import sys
import tempfile

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from paligemma_json.dataset_report import CANDIDATE_BITS, SAME_PHOTO_CORRELATION, fingerprints  # noqa: E402
from paligemma_json.demo import write_demo_dataset  # noqa: E402

COPIES = [(2 / 3, 55), (1 / 2, 40), (3 / 2, 90), (0.8, 70)]  # (scale, JPEG quality)


def main(dataset_dir: str) -> None:
    paths = sorted(glob.glob(os.path.join(dataset_dir, "*", "*.jpg")))
    prints = fingerprints(paths)
    distinct = [(a[0] - b[0], float((a[1] * b[1]).mean())) for a, b in itertools.combinations(prints, 2)]
    with tempfile.TemporaryDirectory() as folder:
        copies = []
        for path, original in zip(paths[:40], prints):
            image = Image.open(path)
            for number, (scale, quality) in enumerate(COPIES):
                copy_path = os.path.join(folder, f"{number}.jpg")
                image.resize((int(image.width * scale), int(image.height * scale))).convert("RGB").save(
                    copy_path, quality=quality)
                (copy,) = fingerprints([copy_path])
                copies.append((original[0] - copy[0], float((original[1] * copy[1]).mean())))
    print(f"{len(paths)} photos, {len(distinct)} distinct pairs, {len(copies)} copies")
    print(f"distinct pairs: hash distance >= {min(d for d, _ in distinct)} bits, "
          f"correlation <= {max(c for _, c in distinct):.4f}")
    print(f"copies:         hash distance <= {max(d for d, _ in copies)} bits, "
          f"correlation >= {min(c for _, c in copies):.4f}")
    print(f"thresholds:     candidates within {CANDIDATE_BITS} bits, confirmed at correlation >= "
          f"{SAME_PHOTO_CORRELATION}")
    false_leaks = sum(d <= CANDIDATE_BITS and c >= SAME_PHOTO_CORRELATION for d, c in distinct)
    missed = sum(not (d <= CANDIDATE_BITS and c >= SAME_PHOTO_CORRELATION) for d, c in copies)
    print(f"false leaks {false_leaks}, missed copies {missed}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as folder:
            write_demo_dataset(folder, seed=42)
            main(folder)
