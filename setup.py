"""Packaging that pyproject.toml cannot say on its own (the rest of the metadata is there).

conf/ and the demo FASTA stay at the repository's top level, the one copy anyone edits; the wheel
carries them inside the package, where protein_performer.resources looks first:

    conf/**/*.yaml                             -> protein_performer/conf/
    data/{uniprot_sample,swissprot_subset}...  -> protein_performer/bundled_data/  (FASTA and the subset's clusters)

Both are data-only packages mapped from those folders, so the build copies the files and nothing is
kept in two places in the repository.
"""
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# The files the shipped data configs name (protein_performer.resources.BUNDLED_DATA_FILES; a test checks).
BUNDLED_DATA_FILES = ["uniprot_sample.fasta", "swissprot_subset.fasta.gz", "swissprot_subset.clusters50.tsv.gz"]
DATA_PACKAGES = {"protein_performer.conf": "conf", "protein_performer.bundled_data": "data"}


class BuildPy(build_py):
    """build_py that takes only the listed files from the data packages (data/ also holds a script)."""

    def find_package_modules(self, package, package_dir):
        return [] if package in DATA_PACKAGES else super().find_package_modules(package, package_dir)


setup(
    packages=[*find_packages(include=["protein_performer", "protein_performer.*"]), *DATA_PACKAGES],
    package_dir=DATA_PACKAGES,
    package_data={"protein_performer.conf": ["*.yaml", "*/*.yaml"],
                  "protein_performer.bundled_data": BUNDLED_DATA_FILES},
    include_package_data=False,
    cmdclass={"build_py": BuildPy},
)
