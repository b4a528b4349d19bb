"""Render this project's kustomizations without kustomize: `python deploy/render.py deploy/k8s/overlays/cpu`.

`kubectl kustomize DIR` (or `kustomize build DIR`) is the real thing and what deploy/README.md tells you
to use. This renderer exists so the tests can render and validate the manifests on a machine without
kubectl (Debian has no kubectl package). It implements only the subset of kustomize these files use, and
refuses anything else rather than guess:

- ``resources``: YAML files (several documents each) and folders with a kustomization.yaml;
- ``namespace``: set on every namespaced object;
- ``labels`` with ``pairs`` and ``includeSelectors: false``: added to each object's metadata.labels only;
- ``images`` with ``name``, ``newName``, ``newTag``: container and init-container images of pod templates;
- ``patches`` with a ``target`` (group, version, kind, name) and an inline JSON 6902 ``patch``
  (add, replace, remove; RFC 6901 pointers).

Transformers run in kustomize's order (patches, namespace, labels, images), and where kubectl is
installed a test checks that both render the same objects.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}
# Objects without a namespace (the kinds these manifests could contain).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
}


class RenderError(ValueError):
    """A kustomization uses something this renderer does not implement, or is wrong."""


def render(folder: Path) -> list[dict]:
    """The objects `kustomize build folder` produces (as far as the supported subset goes)."""
    folder = Path(folder)
    path = folder / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{folder}: no kustomization.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(f"{path}: keys this renderer does not implement: {sorted(unknown)}")

    objects: list[dict] = []
    for entry in spec.get("resources", []):
        target = (folder / entry).resolve()
        if target.is_dir():
            objects.extend(render(target))
        elif target.is_file():
            objects.extend(doc for doc in yaml.safe_load_all(target.read_text()) if doc)
        else:
            raise RenderError(f"{path}: resource {entry!r} does not exist")

    for patch in spec.get("patches", []):
        _apply_patch(objects, patch, path)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = spec["namespace"]
    for label in spec.get("labels", []):
        if set(label) - {"pairs", "includeSelectors"} or label.get("includeSelectors", False):
            raise RenderError(f"{path}: only labels with pairs and includeSelectors: false are implemented")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for image in spec.get("images", []):
        if set(image) - {"name", "newName", "newTag"}:
            raise RenderError(f"{path}: images support name, newName and newTag only")
        for obj in objects:
            for container in _containers(obj):
                _retag(container, image)
    return objects


def _pod_spec(obj: dict) -> dict | None:
    spec = obj.get("spec", {})
    if obj["kind"] == "Pod":
        return spec
    if obj["kind"] == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    return spec.get("template", {}).get("spec")


def _containers(obj: dict) -> list[dict]:
    pod = _pod_spec(obj) or {}
    return [*pod.get("containers", []), *pod.get("initContainers", [])]


def _retag(container: dict, image: dict) -> None:
    current = container.get("image", "")
    # kustomize matches the name with or without a tag or digest.
    name, tag = current, ""
    if "@" in current:
        name, tag = current.split("@", 1)
        tag = "@" + tag
    elif ":" in current.rsplit("/", 1)[-1]:
        name, tag = current.rsplit(":", 1)
        tag = ":" + tag
    if name != image["name"]:
        return
    if "newTag" in image:
        tag = ":" + str(image["newTag"])
    container["image"] = image.get("newName", name) + tag


def _apply_patch(objects: list[dict], patch: dict, path: Path) -> None:
    if set(patch) - {"target", "patch"} or "path" in patch:
        raise RenderError(f"{path}: only patches with target and an inline JSON 6902 patch are implemented")
    target = patch["target"]
    if set(target) - {"group", "version", "kind", "name"}:
        raise RenderError(f"{path}: patch targets support group, version, kind and name only")
    operations = yaml.safe_load(patch["patch"])
    if not isinstance(operations, list):
        raise RenderError(f"{path}: only JSON 6902 patches (a list of operations) are implemented")
    matched = [obj for obj in objects if _matches(obj, target)]
    if not matched:
        raise RenderError(f"{path}: patch target {target} matches no object")
    for obj in matched:
        for operation in operations:
            _json_patch(obj, operation, path)


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return (
        target.get("group", group) == group
        and target.get("version", version) == version
        and target.get("kind", obj["kind"]) == obj["kind"]
        and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]
    )


def _json_patch(obj: dict, operation: dict, path: Path) -> None:
    op, pointer = operation.get("op"), operation.get("path", "")
    if op not in {"add", "replace", "remove"}:
        raise RenderError(f"{path}: JSON 6902 op {op!r} is not implemented")
    if not pointer.startswith("/"):
        raise RenderError(f"{path}: {pointer!r} is not a JSON pointer")
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]
    parent = obj
    for token in tokens[:-1]:
        try:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        except (KeyError, IndexError, ValueError) as error:
            raise RenderError(f"{path}: {pointer} does not exist ({error!r})") from None
    last = tokens[-1]
    value = copy.deepcopy(operation.get("value"))
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            if index > len(parent):
                raise RenderError(f"{path}: {pointer}: index out of range")
            parent.insert(index, value)
            return
        if index >= len(parent):
            raise RenderError(f"{path}: {pointer} does not exist")
        if op == "replace":
            parent[index] = value
        else:
            del parent[index]
        return
    if op != "add" and last not in parent:
        raise RenderError(f"{path}: {pointer} does not exist")
    if op == "remove":
        del parent[last]
    else:
        parent[last] = value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder with a kustomization.yaml")
    args = parser.parse_args(argv)
    try:
        objects = render(args.folder)
    except RenderError as error:
        print(f"render: {error}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
