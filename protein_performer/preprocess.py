"""FASTA -> HDF5 token store.

    python -m protein_performer.preprocess input=uniref50.fasta.gz output=uniref50.h5
    python -m protein_performer.preprocess input='shards/*.fasta' output=all.h5 ood_regex='OS=Homo sapiens'
    python -m protein_performer.preprocess input=swissprot.fasta.gz output=sp.h5 clusters=clusters50.tsv.gz
    protein-performer-preprocess input=uniref50.fasta.gz output=uniref50.h5    # the installed command

Options: conf/preprocess.yaml. Bad input (missing or empty file, binary data, text before the first
'>', a truncated .gz), an output that is an input or not named .h5, an unwritable directory: one line
naming the file and line, exit status 2, and no output file. SIGTERM or Ctrl-C: one line, exit status
143 or 130, no temporary file left; a temporary left by a SIGKILLed run is removed by the next run.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from protein_performer.data.fasta import DataError
from protein_performer.data.splits import SplitSpec
from protein_performer.data.store import TokenStore
from protein_performer.data.store_writer import build_token_store
from protein_performer.errors import records_signals, run_command
from protein_performer.resources import conf_dir


USAGE = "python -m protein_performer.preprocess input=<FASTA file or glob> output=<store.h5> [key=value ...]"


def preprocess(cfg: DictConfig) -> None:
    missing = [key for key in ("input", "output") if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise DataError(f"{' and '.join(missing)} must be given: {USAGE}")
    inputs = OmegaConf.to_container(cfg.input) if isinstance(cfg.input, ListConfig) else str(cfg.input)
    split = SplitSpec(valid_fraction=cfg.valid_fraction, test_fraction=cfg.test_fraction,
                      ood_accessions=cfg.ood_accessions, ood_regex=cfg.ood_regex, clusters=cfg.clusters)
    summary = build_token_store(inputs, cfg.output, split=split, compression=cfg.compression,
                                compression_threads=cfg.compression_threads, chunk_records=cfg.chunk_records,
                                background_reader=cfg.background_reader, workers=cfg.workers,
                                block_bytes=cfg.block_bytes, allow_duplicates=cfg.allow_duplicates, overwrite=cfg.overwrite,
                                any_suffix=cfg.any_suffix, progress=cfg.progress)
    print(f"wrote {cfg.output}\n{summary.format()}")
    if cfg.clusters is not None:
        with TokenStore(cfg.output) as store:
            clustered = int(store.attrs["clustered_records"])
        print(f"clusters     {clustered:>14,} records named by {cfg.clusters}; the other "
              f"{summary.records - clustered:,} are singletons. Splits follow the clusters.")


@records_signals("preprocess")
@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="preprocess")
def main(cfg: DictConfig) -> None:
    def note() -> str:  # the signal came before the store's rename, or (rarely) just after it
        output = None if OmegaConf.is_missing(cfg, "output") else Path(str(cfg.output))
        return f"{output} was complete and is kept" if output is not None and output.exists() else "nothing was written"

    run_command("preprocess", lambda: preprocess(cfg), interrupted_note=note)


if __name__ == "__main__":
    main()
