"""liver_d2: detectron2 RetinaNet for liver tumors on CT.

detectron2 is deliberately not in install_requires: it has no official PyPI release.
`make setup` installs the pinned prebuilt wheel (requirements.txt); users with their own
torch build detectron2 from source first (README, "Other installs") and then
`pip install -e .`.
"""
from setuptools import find_packages, setup

setup(
    name="liver_d2",
    version="0.1.0",
    description="Liver tumor detection on CT slices with detectron2 RetinaNet",
    packages=find_packages(include=["liver_d2", "liver_d2.*"]),
    python_requires=">=3.9",
    install_requires=[
        "numpy<2",
        "opencv-python-headless",
        "nibabel",
        "pydicom",
        "pycocotools",
        "pandas",
        "scipy",
        "matplotlib",
        "tqdm",
        "fvcore",
        "iopath",
    ],
)
