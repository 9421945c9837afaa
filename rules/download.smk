# A checkpoint given by name (v2-small, ...) or as hf://owner/repo/path, fetched once from Hugging
# Face into the cache (tessera download -> tessera.download.download). Defined only while the file is
# not in the cache: its output is a path outside the run, shared by every run that uses the model.

if needs_download(CFG["model"]["checkpoint"], CFG["model"]["cache_dir"]):

    rule download:
        # On the driver's machine (a cluster's login node usually has the internet, compute nodes may not).
        localrule: True
        output:
            CHECKPOINT,
        params:
            options=" ".join(
                [shlex.quote(CFG["model"]["checkpoint"])]
                + ([f"--cache-dir {shlex.quote(CFG['model']['cache_dir'])}"] if CFG["model"]["cache_dir"] else [])
                + ([f"--sha256 {CFG['model']['sha256']}"] if CFG["model"]["sha256"] else [])
            ),
        resources:
            runtime=grows_with_attempt(60),
        log:
            "logs/download.log",
        benchmark:
            "logs/benchmarks/download.tsv"
        conda:
            ENV
        shell:
            "tessera download {params.options} 2> {log}"
