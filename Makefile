# Two commands do everything on a fresh machine (see README.md):
#   make demo   set up, then run the main job on the embedded default over real photos
#   make test   set up with the test extras, then run the whole test suite
#   make test-fast   the tests that need no Redis, S3 or worker process (and are not slow)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
# The worker stack's torch is pinned here: a plain `torch` requirement can pull several GB.
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: demo test test-fast typecheck soak install clean checkov clip-retrieval

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[worker,test]'
	touch $@

install: $(BIN)/.installed

# checkov, the IaC scanner tests/test_deploy_hardening.py runs over deploy/, in a venv of its own
# (its pins of boto3 and packaging clash with the project's).
CHECKOV := $(VENV)/checkov/bin/checkov
$(CHECKOV):
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/python -m pip install --quiet checkov==3.3.30 \
		|| echo "checkov could not be installed: tests/test_deploy_hardening.py will skip its scan"

checkov: $(CHECKOV)

# clip-retrieval 2.45.0, the baseline bench/vs_clip_retrieval.py measures against, in a venv of its own (its pins
# of numpy, pyarrow and webdataset clash with the project's); with the same torch pins, so pip pulls no other torch,
# and setuptools<81: clip-anytorch, which all_clip imports, still imports pkg_resources.
CLIP_RETRIEVAL := $(VENV)/clip-retrieval/bin/clip-retrieval
$(CLIP_RETRIEVAL):
	$(PYTHON) -m venv $(VENV)/clip-retrieval
	$(VENV)/clip-retrieval/bin/python -m pip install --quiet $(TORCH_PINS) clip-retrieval==2.45.0 'setuptools<81'

clip-retrieval: $(CLIP_RETRIEVAL)

demo: $(BIN)/.installed
	$(BIN)/clipbatch demo --workdir demo

test: $(BIN)/.installed $(CHECKOV) typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

# mypy over core/ and tasks/ ([tool.mypy] in pyproject.toml), which it reads as the clipbatch package from
# a tree of links made here: clipbatch/*.py, and core/, orchestration/, tasks/, workers/ under their names.
TYPECHECK_TREE := build/typecheck/clipbatch
typecheck: $(BIN)/.installed
	rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)
	ln -s $(CURDIR)/clipbatch/*.py $(TYPECHECK_TREE)/
	for folder in core orchestration tasks workers; do ln -s $(CURDIR)/$$folder $(TYPECHECK_TREE)/$$folder; done
	$(BIN)/mypy

# Every test that needs no service (Redis, S3, a worker process) and is not slow: the loop while editing.
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not integration and not slow"

# The interleaving searches at length: many seeds, longer runs of operations (tests/test_interleavings*.py:
# embed and score jobs; curation and fine-tune jobs).
soak: $(BIN)/.installed
	CLIPBATCH_INTERLEAVING_SEEDS=$${SEEDS:-40} CLIPBATCH_INTERLEAVING_STAGE_SEEDS=$${STAGE_SEEDS:-6} \
		CLIPBATCH_INTERLEAVING_STEPS=$${STEPS:-14} \
		$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_interleavings.py tests/test_interleavings_stages.py

clean:
	rm -rf $(VENV) demo
