"""The worker image recipe (docker/Dockerfile cannot be built here: no Docker daemon, no GitHub):
detectron2 pinned to the tested full commit, the image tag and code version passed in as
environment variables for the manifest, and docker/README.md's commands passing them."""
import re
from pathlib import Path

DOCKER = Path(__file__).resolve().parent.parent / "docker"
TESTED_DETECTRON2 = "02b5c4e295e990042a714712c21dc79b731e8833"  # NOTES.md: 02b5c4e


def test_dockerfile_pins_detectron2_and_records_the_image():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert re.search(rf"^ARG DETECTRON2_REF={TESTED_DETECTRON2}$", dockerfile, re.MULTILINE)
    assert 'test "$(git -C /opt/detectron2 rev-parse HEAD)" = "${DETECTRON2_REF}"' in dockerfile
    assert "checkout ${DETECTRON2_REF}" not in dockerfile and "=main" not in dockerfile
    env = re.search(r"^ENV FDH_BEAM_IMAGE=\$\{FDH_BEAM_IMAGE\} FDH_BEAM_GIT_SHA=\$\{FDH_BEAM_GIT_SHA\}",
                    dockerfile, re.MULTILINE)
    assert env, "the image tag and code version must reach the workers' environment"


def test_readme_tags_the_image_with_the_git_sha_and_passes_it_in():
    readme = (DOCKER / "README.md").read_text()
    assert "SHA=$(git rev-parse HEAD)" in readme
    assert "fdh-beam-worker:${SHA:0:12}" in readme
    assert "--build-arg FDH_BEAM_IMAGE=$IMAGE --build-arg FDH_BEAM_GIT_SHA=$SHA" in readme
    assert "docker push $IMAGE" in readme
