from setuptools import find_packages, setup

setup(
    name="gpt_vision",
    version="0.1.0",
    description="Generative pretraining of image transformers (Image-GPT) at scale",
    python_requires=">=3.10",
    packages=find_packages(include=["gpt_vision", "gpt_vision.*", "data_shards", "data_shards.*"]) + ["gpt_vision.configs"],
    # The shipped presets travel with an installed package as gpt_vision/configs (`defaults:` finds them).
    package_dir={"gpt_vision.configs": "configs"},
    package_data={"gpt_vision.configs": ["*/*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "deepspeed>=0.15",
        "webdataset>=0.2.90",
        "fairscale>=0.4.13",
        "tensorboard>=2.15",
        "submitit>=1.5",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "pillow>=10.0",
        "safetensors>=0.4",
        "tqdm>=4.66",
    ],
    extras_require={"dev": ["pytest>=8.0", "pytest-timeout>=2.3", "transformers>=4.45", "scikit-learn>=1.3"]},
    entry_points={
        "console_scripts": [
            "data-shards=data_shards.cli:main",
            "gpt-vision-pretrain=gpt_vision.cli:pretrain_main",
            "gpt-vision-finetune=gpt_vision.cli:finetune_main",
            "gpt-vision-sample=gpt_vision.cli:sample_main",
            "gpt-vision-export=gpt_vision.cli:export_main",
        ]
    },
)
