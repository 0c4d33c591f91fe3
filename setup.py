"""Packaging for the `demucs` package, its configs and the `demucs` command."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements(name: str) -> list[str]:
    lines = (HERE / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines
            if line.strip() and not line.startswith(("#", "-r"))]


setup(
    name="demucs",
    version="3.0.1",
    description=("Demucs (v3 Hybrid, v4 Hybrid Transformer): music source separation, "
                 "training framework"),
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # tools/: the scripts of the training workflow (`python -m tools.export SIG`, ...).
    packages=find_packages(include=["demucs", "demucs.*", "tools"]),
    package_data={"demucs": ["py.typed", "remote/*.txt", "remote/*.yaml"]},
    include_package_data=True,
    install_requires=read_requirements("requirements_minimal.txt"),
    # The ONNX backends (demucs/backends.py, docs/onnx.md): the exporter's packages and a
    # runtime; `make install` installs both extras.
    extras_require={
        "dev": read_requirements("requirements.txt"),
        "onnx": ["onnx>=1.16", "onnxscript>=0.5", "onnxruntime>=1.16"],
        "openvino": ["onnx>=1.16", "onnxscript>=0.5", "openvino>=2023.3"],
    },
    entry_points={"console_scripts": ["demucs=demucs.separate:main"]},
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Topic :: Multimedia :: Sound/Audio",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
