from setuptools import find_packages, setup

setup(
    name="megatron_diffu",
    version="0.1.0",
    description="Megatron-style training framework for masked-diffusion language models of code",
    packages=find_packages(include=["megatron_diffu", "megatron_diffu.*"]),
    package_data={"megatron_diffu": ["convert/hf_modeling/*.py", "data/assets/*"]},
    python_requires=">=3.10",
    # torch is installed first, pinned, by scripts/setup.sh: an unpinned torch pulls a CUDA build.
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "megatron-core==0.16.1",
        "tokenizers",
        "sentencepiece",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "transformers>=4.45", "safetensors"],
        "hf": ["transformers>=4.45", "safetensors"],
        "gpu": ["transformer-engine[pytorch]"],
    },
)
