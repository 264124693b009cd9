"""``extproc httproutes render``: print the HTTPRoutes the model labels call for.

From files (``-f``, repeatable, ``-`` for stdin; any mix of kinds, ``kind: List`` included) or,
without ``-f``, from the Deployments and Pods in the cluster. Findings go to stderr, the YAML to
stdout, so ``extproc httproutes render -f app.yaml | kubectl apply -f -`` works.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from extproc import config
from extproc.config import ConfigError, KubernetesSettings
from extproc.kube.httproutes import RouteOptions, flatten, render
from extproc.kube.model_labels import SELECTOR

SETTINGS = (
    "config",
    "kubeconfig",
    "watch_namespaces",
    "gateway_namespace",
    "gateway_name",
    "route_timeout",
)
"""The settings the render reads; the same flags, environment variables and YAML keys as serve."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--filename",
        action="append",
        dest="filenames",
        metavar="FILE",
        help="YAML file with Deployments and/or Pods ('-' reads stdin; repeatable); "
        "without it, the cluster's Deployments and Pods are listed",
    )


def read_objects(filenames: list[str], stdin: TextIO) -> list[dict[str, Any]]:
    documents: list[Any] = []
    for name in filenames:
        try:
            text = stdin.read() if name == "-" else Path(name).read_text()
            documents.extend(yaml.safe_load_all(text))
        except OSError as exc:
            raise ConfigError("--filename", f"cannot read {name}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError("--filename", f"{name} is not valid YAML: {exc}") from None
    return flatten(documents)


def list_cluster(settings: KubernetesSettings) -> list[dict[str, Any]]:
    from extproc.kube.client import (
        DEPLOYMENT,
        MODEL_ADAPTER,
        POD,
        ApiException,
        Kube,
        load_api_client,
    )

    api = load_api_client(settings.kubeconfig)
    try:
        kube = Kube(api)
        objects: list[dict[str, Any]] = []
        namespaces: list[str | None] = [*settings.namespaces] or [None]
        for namespace in namespaces:
            for resource in (DEPLOYMENT, POD):
                items, _ = kube.list(resource, namespace, SELECTOR)
                objects.extend(items)
            try:
                items, _ = kube.list(MODEL_ADAPTER, namespace)
            except ApiException as exc:
                if exc.status != 404:  # 404: no ModelAdapter CRD here, so no adapters
                    raise
            else:
                objects.extend(items)
        return objects
    finally:
        api.close()  # type: ignore[no-untyped-call]


def run(args: argparse.Namespace) -> int:
    stdout, stderr = sys.stdout, sys.stderr
    flags = {name: getattr(args, name, None) for name in SETTINGS}
    try:
        settings = config.load(flags).kubernetes
        if args.filenames:
            objects = read_objects(args.filenames, sys.stdin)
        else:
            objects = list_cluster(settings)
    except ConfigError as exc:
        print(f"extproc: {exc}", file=stderr)
        return 2
    except Exception as exc:
        print(f"extproc: cannot list Deployments and Pods: {exc}", file=stderr)
        return 1
    options = RouteOptions(
        settings.gateway_namespace, settings.gateway_name, settings.route_timeout
    )
    rendering = render(objects, options)
    for finding in rendering.findings:
        print(f"warning: {finding.message}", file=stderr)
    if not rendering.objects:
        print("extproc: no Deployment or Pod carries model.aibrix.ai/name", file=stderr)
    yaml.safe_dump_all(rendering.objects, stdout, sort_keys=False)
    return 0
