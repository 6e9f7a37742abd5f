# syntax=docker/dockerfile:1
# The image every pod of a jointray Ray cluster runs: head, training workers, Serve replicas.
#
#   docker build -t jointray:cpu .                          # CPU nodes (torch's CPU wheel)
#   docker build --build-arg VARIANT=gpu -t jointray:gpu .  # NVIDIA GPU nodes (torch's CUDA build)
#
# The base is Ray's own image of the Ray version constraints.txt pins (a test checks they agree), so the
# cluster's Ray and jointray's are one and the same.
ARG RAY_VERSION=2.60.0
ARG PYTHON=py311
ARG VARIANT=cpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-cpu AS base-cpu
# torch's CPU wheels: without this index pip takes the CUDA build (several GB) for a CPU node.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-gpu AS base-gpu

FROM base-${VARIANT}
WORKDIR /home/ray/jointray
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users jointray/ jointray/
COPY --chown=ray:users jobs/ jobs/
# configs/ at the top is a link into jointray/configs (copied above); jobs and the CLI read the configs by name.
# The same two installs as the Makefile's, against the same constraints file: the exact tested versions.
RUN python -m pip install --no-cache-dir -c constraints.txt torch==2.13.0 \
 && python -m pip install --no-cache-dir -c constraints.txt -e .
ENV RAY_USAGE_STATS_ENABLED=0 \
    RAY_DATA_DISABLE_PROGRESS_BARS=1 \
    RAY_TRAIN_ENABLE_PRINT_PATCH=0
# Ray's images start nothing by themselves: KubeRay runs `ray start` in each pod.
