"""MkDocs hook: serve benchmarks/plots/*.png as plots/*.png, so pages show the committed plots
without a second copy of them under docs/ (pages link them as plots/NAME.png)."""

from pathlib import Path

from mkdocs.structure.files import File


def on_files(files, config):
    root = Path(config["config_file_path"]).resolve().parent
    for png in sorted((root / "benchmarks" / "plots").glob("*.png")):
        files.append(
            File(
                f"plots/{png.name}",
                src_dir=str(root / "benchmarks"),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
