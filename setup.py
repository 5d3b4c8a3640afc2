"""fdh-beam: rebuild and maintain the Flickr Diverse Humans (FDH) dataset with Apache Beam."""
from setuptools import find_packages, setup

BASE = [
    "apache-beam>=2.60",
    "pyarrow>=14",
    "webdataset>=0.2.26",
    "numpy>=1.24",
    "Pillow>=10",
    "scipy>=1.10",
    "urllib3>=2",
    "simplejpeg>=1.7",  # strict libjpeg-turbo check of JPEG entropy data (decode guard)
    "tqdm>=4.60",
]

EXTRAS = {
    # Run on Google Cloud: gs:// I/O and the Dataflow runner.
    "gcp": ["apache-beam[gcp]>=2.60", "google-cloud-storage>=2.10"],
    # The GPU annotators (torchvision detectors). DensePose CSE needs detectron2 from source (docker/).
    "models": ["torch>=2.1", "torchvision>=0.16"],
    # The offline CPU annotator: mediapipe 0.10.21 is the last release that ships its pose and
    # segmentation models inside the wheel (it pins numpy<2).
    "lite": ["mediapipe==0.10.21"],
    # `make demo`: the lite annotator (mediapipe) + the sample photos and the contact sheet /
    # licence pie; no torch (its own venv, .venv-demo, about 1 GB).
    "demo": ["mediapipe==0.10.21", "scikit-image>=0.21", "matplotlib>=3.7"],
    "test": [
        "pytest>=7",
        "pytest-timeout>=2",
        "hypothesis>=6",
        "pandas>=2",
        "scikit-image>=0.21",
        "matplotlib>=3.7",
        "gcp-storage-emulator>=2024.0",
        "import-linter>=2.1",
        "duckdb>=1.0",  # the README's Parquet query (tests/test_readme.py)
    ],
}
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})

setup(
    name="fdh-beam",
    version="0.1.0",
    description="Rebuild the Flickr Diverse Humans dataset from YFCC100M with Apache Beam",
    packages=find_packages(include=["beam_jobs", "beam_jobs.*", "dataset", "dataset.*", "transforms",
                                    "transforms.*"]),
    python_requires=">=3.10",
    install_requires=BASE,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
