from setuptools import find_packages, setup

setup(
    name="pretrain",
    version="0.1.0",
    description="Distributed GPT pretraining: tensor, pipeline and data parallelism with DeepSpeed ZeRO",
    python_requires=">=3.10",
    packages=find_packages(include=["pretrain", "pretrain.*"]),
    install_requires=[
        # Install with `-c constraints.txt`: it pins the CPU/CUDA build already on the machine.
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "tensorboard",
        "matplotlib",
        "tqdm",
        "zstandard",  # .zst corpora in tools/preprocess_data.py
        "pyarrow>=16",  # Parquet and Arrow (datasets.save_to_disk) corpora in tools/preprocess_data.py
        "tokenizers",  # Hugging Face tokenizer.json files (no transformers needed)
        "safetensors",  # checkpoint tensor files: read lazily, never unpickled
    ],
    extras_require={
        # Install with DS_BUILD_OPS=0: no C++ op is built at install; the first ZeRO run compiles
        # one small communication op with g++ and ninja (~30 s, cached under TORCH_EXTENSIONS_DIR).
        # Pinned: pretrain/parallel/zero.py drives the ZeRO optimizer's backward hooks itself.
        "zero": ["deepspeed==0.19.8"],
        # ruff pinned: another version may format differently and fail the format check.
        "test": [
            "pytest",
            "hypothesis",
            "transformers",
            "megatron-core==0.16.1",
            "deepspeed==0.19.8",
            "mpi4py",
            "ruff==0.17.6",
        ],
        "hf": ["transformers"],
        "kernels": ["triton"],
        "mpi": ["mpi4py"],
    },
)
