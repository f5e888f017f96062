from setuptools import setup, find_packages

# Tested together: nnunetv2 2.8.1, torch 2.15.0, torchvision 0.29.2, opacus 1.6.0, flwr 1.41.0.
# torch and torchvision must come from the same release line (nnU-Net's trainer lookup imports timm,
# which imports torchvision; a mismatched pair fails with "operator torchvision::nms does not exist").
INSTALL_REQUIRES = [
    "nnunetv2>=2.8.1,<2.9",
    "torch>=2.15,<2.16",
    "torchvision>=0.29.2,<0.30",
    "opacus>=1.6,<1.7",
    "flwr>=1.41,<1.42",
    # the Fleet gateway and certificates (nnunet_fed.deployment); Flower 1.41 depends on them too
    "cryptography>=41",
    "httpx>=0.27",
    "starlette>=0.37",
    "uvicorn>=0.29",
    "batchgenerators>=0.25.1",
    "SimpleITK>=2.3",
    "numpy>=1.26",
    "matplotlib>=3.7",
    "tqdm>=4.60",
]

setup(
    name="nnunet_fed",
    version="0.1.0",
    description="Federated, differentially private and personalised training for nnU-Net v2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunet_fed", "nnunet_fed.*"])
    + ["nnunet_fed.trainers", "nnunet_fed.plans"],
    package_dir={"nnunet_fed.trainers": "trainers", "nnunet_fed.plans": "plans"},
    package_data={"nnunet_fed.deployment": ["app/pyproject.toml"]},  # the Flower app (flwr run)
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=7", "dp-accounting>=0.4"]},
    entry_points={"console_scripts": ["nnunet_fed=nnunet_fed.cli:main"]},
)
