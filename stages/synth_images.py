"""DVC stage synth_images: params synth_images -> procedural SEM/TEM images with ground truth.

Writes paths.synthetic_images/<class>/<image_id>.tif + <image_id>.json (sidecar with the
ground truth); the folder is rewritten from scratch. Run: python -m stages.synth_images
"""

from semilens.images.synth import synth_images
from semilens.stage_runner import run_stage


def main() -> dict:
    return run_stage("synth_images", lambda cfg: synth_images(cfg.synth_images, cfg.paths.synthetic_images))


if __name__ == "__main__":
    main()
