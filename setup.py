"""af_train: distributed training of AudioFormer (audio classification as language understanding)."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent

setup(
    name="af_train",
    version="0.1.0",
    description="AudioFormer training: EnCodec acoustic codes, RoFormer MLM pretraining, "
    "classification and multi-positive contrastive fine-tuning on DeepSpeed ZeRO",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `tools/` is installed as `af_train_tools` so the console scripts can import it.
    packages=["af_train", "af_train.checkpoint", "af_train.config", "af_train.data", "af_train.model",
              "af_train.objectives", "af_train.prepare", "af_train.tokenizers", "af_train.inference",
              "af_train.experiment", "kernels", "af_train_tools"],
    package_dir={"af_train_tools": "tools"},
    install_requires=[
        # Exact versions live in constraints.txt (ABI-coupled stack, see the comment there).
        "torch",
        "torchaudio",
        "torchvision",
        "triton",
        "deepspeed",
        "encodec",
        "mosaicml-streaming",
        "numpy",
        "pyyaml",
        "tensorboard",
        "soundfile",
        "tqdm",
        "transformers",
        "matplotlib",
        "safetensors",
        "faiss-cpu",  # k-means of the mel-rvq tokenizer (af-fit-tokenizer)
        "scipy",
        "scikit-learn",  # af-probe and train.probe: logistic-regression probes
        "espeakng-loader",  # af-synth-speech: the eSpeak NG library and voices in a wheel
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-timeout",
            "ruff",
            "moto[server]",
        ],
    },
    entry_points={
        "console_scripts": [
            "af-prepare=af_train.prepare.cli:main",
            "af-fit-tokenizer=af_train.prepare.fit_tokenizer:main",
            "af-synth-audio=af_train_tools.make_synthetic_audio:main",
            "af-synth-speech=af_train_tools.make_speech_audio:main",
            "af-inspect-shards=af_train_tools.inspect_shards:main",
            "af-benchmark-kernels=af_train_tools.benchmark_kernels:main",
            "af-kernel-compile-report=af_train_tools.kernel_compile_report:console_main",
            "af-benchmark-data=af_train_tools.benchmark_data:main",
            "af-benchmark-train=af_train_tools.benchmark_train:main",
            "af-export-hf=af_train.inference.export_hf:main",
            "af-train=af_train.train:launch_main",
            "af-evaluate=af_train.evaluate:main",
            "af-predict=af_train.inference.predict:main",
            "af-embed=af_train.inference.embed:main",
            "af-experiment=af_train.experiment.cli:main",
            "af-probe=af_train.inference.probe:main",
        ],
    },
)
