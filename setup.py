from setuptools import find_packages, setup

setup(
    name="sag-adm",
    version="0.1.0",
    description="Self-Attention Guidance on OpenAI ADM / IDDPM pixel diffusion models, "
                "with a TensorFlow-free evaluator",
    packages=find_packages(include=["guided_diffusion", "guided_diffusion.*", "evaluations", "evaluations.*"]),
    python_requires=">=3.9",
    # torch is installed first by scripts/setup_env.sh (torch==2.13.0 CPU here).  2.5 is the
    # oldest release the test suite passed on (2.5.1; 2.4.1 fails --compile with SAG, 2.1.2 also
    # fp16 convolutions on the CPU): see README, "Running on a SLURM cluster".
    install_requires=["torch>=2.5", "numpy", "scipy", "tqdm", "blobfile", "mpi4py", "pyyaml"],
    extras_require={
        "mpi": ["mpich"],  # an MPI runtime (mpiexec) inside the virtual environment
        "images": ["pillow"],  # image-folder datasets for training
        "sweep": ["matplotlib"],  # figures of scripts/sweep.py (tables need nothing extra)
        "test": ["pytest", "mpich", "pillow", "matplotlib"],
    },
)
