"""Every environment variable the manifests give a service is one its settings class reads, with a valid value.

The settings classes are found, not listed: services/<service>/config.py, the BaseSettings subclass whose
env_prefix is <SERVICE>_. A service whose config module does not exist yet is reported as skipped; once
the module appears, its variables are checked without any change here.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os

import pytest
from pydantic import AliasChoices, ValidationError
from pydantic_settings import BaseSettings, SettingsError

from tests.deploy.manifests import (
    COMMAND_SERVICE,
    REPO,
    Obj,
    container_env,
    find,
    kustomizations,
    our_containers,
    overlays,
)


def settings_class(service: str) -> type[BaseSettings] | None:
    """The service's settings class, or None while services/<service>/config.py does not exist."""
    if not (REPO / "services" / service / "config.py").exists():
        return None
    module = importlib.import_module(f"services.{service}.config")
    prefix = f"{service.upper()}_"
    found = [cls for _, cls in inspect.getmembers(module, inspect.isclass)
             if issubclass(cls, BaseSettings) and cls.__module__ == module.__name__
             and cls.model_config.get("env_prefix") == prefix]
    assert len(found) == 1, f"services/{service}/config.py: expected one settings class with env_prefix {prefix}"
    return found[0]


def env_names(cls: type[BaseSettings]) -> dict[str, str]:
    """Environment variable -> field name, as pydantic-settings reads them (prefix + field, or an alias)."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names = {}
    for field_name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, str):
            names[alias.upper()] = field_name
        elif isinstance(alias, AliasChoices):
            names.update({str(choice).upper(): field_name for choice in alias.choices if isinstance(choice, str)})
        else:
            names[f"{prefix}{field_name}".upper()] = field_name
    return names


def env_problems(objs: list[Obj], service: str, cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch,
                 containers_of: list[Obj] | None = None) -> list[str]:
    """Variables the service's containers get but ``cls`` does not read, and values it rejects."""
    known = env_names(cls)
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    problems = []
    for pod, container, svc in our_containers(containers_of if containers_of is not None else objs):
        if svc != service:
            continue
        env = container_env(objs, pod, container)
        unknown = sorted(set(env) - set(known))
        if unknown:
            problems.append(f"{pod.name}: {cls.__name__} reads no {unknown} (typo?)")
        # The values must parse too: build the settings from exactly this environment.
        with monkeypatch.context() as patch:
            for var in [v for v in os.environ if v.upper().startswith(prefix)]:
                patch.delenv(var)
            for var, value in env.items():
                patch.setenv(var, value)
            try:
                cls()
            except (ValidationError, SettingsError) as exc:
                problems.append(f"{pod.name}: {cls.__name__} rejects the values: {exc}")
    return problems


def test_every_container_of_our_image_runs_a_known_service(rendered: dict[str, list[Obj]]) -> None:
    services = {s for objs in rendered.values() for _, _, s in our_containers(objs)}
    assert services == {"encoder", "search", "evaluator"}


@pytest.mark.parametrize("service", sorted(set(COMMAND_SERVICE.values())))
def test_env_vars_are_read_by_the_service(rendered: dict[str, list[Obj]], service: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cls = settings_class(service)
    if cls is None:
        pytest.skip(f"services/{service}/config.py does not exist yet: {service.upper()}_* variables unchecked")
    checked = []
    for name in sorted(kustomizations()):
        if not any(s == service for _, _, s in our_containers(rendered[name])):
            continue
        # A Job is applied next to an overlay and takes its ConfigMaps and Secrets from there.
        contexts = [rendered[o] for o in overlays()] if name.startswith("jobs/") else [[]]
        for context in contexts:
            assert env_problems(rendered[name] + context, service, cls, monkeypatch, rendered[name]) == [], name
        checked.append(name)
    assert checked, f"no kustomization runs the {service} service"


def test_a_misspelt_variable_is_caught(rendered: dict[str, list[Obj]], monkeypatch: pytest.MonkeyPatch) -> None:
    cls = settings_class("encoder")
    assert cls is not None
    objs = copy.deepcopy(rendered["overlays/cpu-dev"])
    data = find(objs, "ConfigMap", "encoder")["data"]  # type: ignore[index]
    data["ENCODER_MODEL"] = data.pop("ENCODER_MODELS")
    problems = env_problems(objs, "encoder", cls, monkeypatch)
    assert len(problems) == 1 and "['ENCODER_MODEL']" in problems[0]


def test_an_invalid_value_is_caught(rendered: dict[str, list[Obj]], monkeypatch: pytest.MonkeyPatch) -> None:
    cls = settings_class("search")
    if cls is None:
        pytest.skip("services/search/config.py does not exist yet")
    objs = copy.deepcopy(rendered["overlays/production"])
    find(objs, "ConfigMap", "search")["data"]["SEARCH_BACKEND"] = "qdrant"  # type: ignore[index]
    problems = env_problems(objs, "search", cls, monkeypatch)
    assert problems and all("rejects the values" in p and "backend" in p for p in problems)


def test_the_settings_classes_are_discovered() -> None:
    configs = sorted(p.parent.name for p in (REPO / "services").glob("*/config.py"))
    assert "encoder" in configs
    assert all(settings_class(service) is not None for service in configs)
