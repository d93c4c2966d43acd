# prolong-nemo on the NGC NeMo Framework container (Megatron-Bridge + Megatron-Core + TE).
#
#   docker build -t prolong-nemo:26.06 .                      # or --build-arg BASE_IMAGE=...:26.04
#   (push it, then `prolong-nemo launch ... cluster.container_image=<registry>/prolong-nemo:26.06`)
#   docker run --gpus all --ipc=host -v /data:/data prolong-nemo:26.06 \
#       prolong-nemo train stage_64k data.root=/data/prolong-data-64K checkpoint.dir=/data/runs/64k
#
# The container's torch, transformers (5.x), numpy, megatron-core, megatron-bridge and
# Transformer Engine must stay exactly as NVIDIA built them. A plain `pip install .` would let
# mosaicml-streaming's `transformers<5` / `numpy<2.2` pins downgrade them and break Bridge, so
# everything here is installed with --no-deps, and the build fails if any of those packages
# changed. Stage chaining (512K from 64K with Adam state) needs Bridge >= 0.5 (NGC 26.06+).
ARG BASE_IMAGE=nvcr.io/nvidia/nemo:26.06
FROM ${BASE_IMAGE}

ENV PROLONG_ROOT=/opt/prolong-nemo \
    PROLONG_RECIPES_DIR=/opt/prolong-nemo/recipes \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The stack the container ships, to compare after installing.
RUN python -m pip list --format=freeze \
      | grep -iE '^(torch|transformers|numpy|megatron[-_]core|megatron[-_]bridge|transformer[-_]engine[-_a-z0-9]*|nvidia-cudnn[-_a-z0-9]*)==' \
      | sort > /tmp/stack-before.txt && cat /tmp/stack-before.txt

# mosaicml-streaming (the MDS reader) without its pins, plus what it imports at run time. Names
# without versions are satisfied by whatever the container already has: only missing ones land.
RUN python -m pip install --no-deps "mosaicml-streaming==0.13.0" \
 && python -m pip install --no-deps xxhash zstd python-snappy cramjam brotli catalogue \
 && python -m pip install --no-deps hydra-core omegaconf antlr4-python3-runtime safetensors tiktoken tqdm \
 && python -m pip install --no-deps llama-models

# The plugin itself, editable so recipes/ (Hydra YAML + bridge_entry.py) stays next to it.
WORKDIR /opt/prolong-nemo
COPY pyproject.toml README.md ./
COPY prolong_nemo ./prolong_nemo
COPY recipes ./recipes
COPY docs ./docs
RUN python -m pip install --no-deps --no-build-isolation -e .

# The fingerprint of the code this image holds. Every job `prolong-nemo launch` submits starts
# with a preflight in the image that refuses to train when it is not the fingerprint of the
# checkout that planned and submitted the job (prolong_nemo/recipes/preflight.py). Set the
# pushed image as `cluster.container_image` (the stock NGC image is refused: it has no plugin).
RUN python -c "from prolong_nemo.recipes.preflight import code_fingerprint; print(code_fingerprint())" \
      > /opt/prolong-nemo/CODE_FINGERPRINT && cat /opt/prolong-nemo/CODE_FINGERPRINT

# Refuse an image whose Megatron / transformers stack moved, and check that the plugin's
# data and recipe modules import under the container's transformers (no GPU at build time:
# nothing that imports Transformer Engine is imported here). The plan of stage_64k checks the
# container's megatron-core / TE / Bridge versions; stage_512k would also demand Bridge >= 0.5
# and refuse the 26.04 base (tests/test_plan.py runs this line against both stacks).
RUN python -m pip list --format=freeze \
      | grep -iE '^(torch|transformers|numpy|megatron[-_]core|megatron[-_]bridge|transformer[-_]engine[-_a-z0-9]*|nvidia-cudnn[-_a-z0-9]*)==' \
      | sort > /tmp/stack-after.txt \
 && diff -u /tmp/stack-before.txt /tmp/stack-after.txt \
 && python -c "import streaming, transformers; \
from prolong_nemo.recipes.stages import load_recipe; from prolong_nemo.recipes.plan import make_plan; \
[load_recipe(n) for n in ('stage_64k', 'stage_512k', 'sft')]; \
print('transformers', transformers.__version__, '- recipes OK')" \
 && prolong-nemo plan stage_64k

# On a GPU node, `prolong-nemo plan <recipe> --strict-env` also checks TE, cuDNN and Bridge.
CMD ["prolong-nemo", "--help"]
