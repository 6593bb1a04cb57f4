"""Where devices are told to connect: MQTT_PUBLIC_URLS, or the broker the instance uses."""

from __future__ import annotations

import pytest

from libs.config import ConfigError
from services.instance.devices import broker_address, broker_urls
from services.instance.settings import InstanceSettings


def settings(public: str = "") -> InstanceSettings:
    return InstanceSettings(
        instance_customer_id="c1",
        database_url="postgresql://u@127.0.0.1:5432/db",
        license_jwks_url="http://127.0.0.1/jwks",
        mqtt_host="10.0.0.7",
        mqtt_port=1884,
        mqtt_public_urls=public,
    )


def test_without_public_urls_devices_get_the_instances_own_broker() -> None:
    assert broker_urls(settings()) == ["mqtt://10.0.0.7:1884"]
    assert broker_address(broker_urls(settings())[0]) == ("10.0.0.7", 1884)


def test_public_urls_are_listed_in_order_with_default_ports() -> None:
    urls = broker_urls(settings(" wss://c1.example.io/mqtt , mqtts://mqtt.example.io "))
    assert urls == ["wss://c1.example.io/mqtt", "mqtts://mqtt.example.io"]
    assert broker_address(urls[0]) == ("c1.example.io", 443)
    assert broker_address(urls[1]) == ("mqtt.example.io", 8883)


@pytest.mark.parametrize("bad", ["https://c1.example.io", "c1.example.io:1883", "mqtt://"])
def test_a_url_that_is_not_a_broker_is_a_configuration_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="MQTT_PUBLIC_URLS"):
        broker_urls(settings(bad))
