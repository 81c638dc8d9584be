from setuptools import find_packages, setup

setup(
    name="sag-adm",
    version="0.1.0",
    description="Self-Attention Guidance on OpenAI ADM / IDDPM pixel diffusion models, "
                "with a TensorFlow-free evaluator",
    packages=find_packages(include=["guided_diffusion", "guided_diffusion.*", "evaluations", "evaluations.*"]),
    python_requires=">=3.9",
    # torch is installed first by scripts/setup_env.sh (torch==2.13.0 CPU here); any 2.x works.
    install_requires=["torch>=2.0", "numpy", "scipy", "tqdm", "blobfile", "mpi4py", "pyyaml"],
    extras_require={
        "mpi": ["mpich"],  # an MPI runtime (mpiexec) inside the virtual environment
        "images": ["pillow"],  # image-folder datasets for training
        "sweep": ["matplotlib"],  # figures of scripts/sweep.py (tables need nothing extra)
        "test": ["pytest", "mpich", "pillow", "matplotlib"],
    },
)
