"""`gatewatch deploy render`: Kubernetes manifests for an N-process cluster (deploy/render.py)."""

from __future__ import annotations

import click

from deploy.render import DeployOptions, render, to_yaml


@click.group()
def deploy() -> None:
    """Kubernetes manifests: the ingest flow as a Bytewax cluster, the API with an autoscaler
    and a spool volume per pod."""


@deploy.command("render")
@click.option("--processes", default=3, show_default=True, type=click.IntRange(1), help="Bytewax processes (pods).")
@click.option("--namespace", default="gatewatch", show_default=True)
@click.option("--image", default="gatewatch:latest", show_default=True)
@click.option("--kafka-bootstrap", default="kafka:9092", show_default=True)
@click.option("--redis-url", default="redis://redis:6379/0", show_default=True)
@click.option("--parquet-root", default="s3://gatewatch-raw/events", show_default=True)
@click.option("--recovery-partitions", type=click.IntRange(1), help="Default: one per process.")
@click.option("--shared-recovery-claim", help="A ReadWriteMany claim for every pod's recovery (lets the cluster rescale).")
@click.option("--api-spool-gib", default=1, show_default=True, type=click.IntRange(1),
              help="Size of each API pod's spool volume (its durable buffer while Kafka is away).")
@click.option("--shared-spool-claim",
              help="A ReadWriteMany claim for every API pod's spool: the API becomes a Deployment.")
@click.option("--drain-api-spool", "drain_api_spools", multiple=True, type=click.IntRange(0), metavar="ORDINAL",
              help="Add a Job draining the retained spool claim of this scaled-down API pod (repeatable).")
@click.option("--out", type=click.File("w"), default="-", help="Write here (default: stdout).")
def render_command(processes, namespace, image, kafka_bootstrap, redis_url, parquet_root, recovery_partitions,
                   shared_recovery_claim, api_spool_gib, shared_spool_claim, drain_api_spools, out) -> None:
    """Print the manifests as YAML, for `kubectl apply -f -`."""
    try:
        documents = render(DeployOptions(
            processes=processes, namespace=namespace, image=image, kafka_bootstrap=kafka_bootstrap,
            redis_url=redis_url, parquet_root=parquet_root, recovery_partitions=recovery_partitions,
            shared_recovery_claim=shared_recovery_claim, api_spool_gib=api_spool_gib,
            shared_spool_claim=shared_spool_claim, drain_api_spools=tuple(drain_api_spools)))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    out.write(to_yaml(documents))
