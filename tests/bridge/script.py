"""A Twinkle script run on twinkle_dask through the bridge, printing what the tests check as JSON.

``from twinkle import initialize`` and the components are imported before the bridge, a second
class is decorated after it: every one of them must run on the cluster.
"""

import json
import os
import sys

import twinkle
from early_components import Scaler, Source, Tally
from twinkle import DeviceGroup, DeviceMesh, get_device_placement, initialize, remote_class, remote_function

import twinkle_dask.bridge  # noqa: E402,F401  (the one added line)


@remote_class()
class Late:
    """Decorated after the bridge import, with a reference to remote_class taken before it."""

    def __init__(self, **kwargs):
        self.rank = int(os.environ['RANK'])

    @remote_function(dispatch='slice', collect='sum')
    def count(self, items):
        return len(items) * 10 + self.rank


def main():
    case = sys.argv[1] if len(sys.argv) > 1 else 'full'
    device_type = os.environ.get('BRIDGE_DEVICE_TYPE', 'CPU')
    groups = [DeviceGroup(name='model', ranks=2, device_type=device_type),
              DeviceGroup(name='other', ranks=1, device_type='CPU')]
    if case == 'no-initialize':
        Scaler(1.0, device_mesh=DeviceMesh.from_sizes(dp_size=2), remote_group='model')
        return
    initialize(mode='dask', groups=groups, seed=7, lazy_collect=False)
    mesh = DeviceMesh.from_sizes(dp_size=2)
    scaler = Scaler(2.0, device_mesh=mesh, remote_group='model')
    source = Source(5, device_mesh=mesh, remote_group='model')
    late = Late(remote_group='model')
    draw = scaler.draw()
    tally = Tally()
    tally_type = tally.add(scaler.draw())
    out = {
        'apply': scaler.apply([1, 2, 3]),
        'draw_lazy_type': type(draw).__name__,
        'draw': draw(),
        'identity': scaler.identity(),
        'nested': scaler.nested_draw(),
        'total': scaler.total(scaler.apply([1, 2, 3, 4])),
        'len': len(source),
        'batches': [batch for batch in source],
        'source_dp': source.mesh_size(),
        'late': late.count([1, 2, 3, 4, 5]),
        'actors': len(scaler._actors),
        'handle_is_instance': isinstance(scaler, Scaler),
        'placement': get_device_placement(),
        'twinkle_mode': twinkle.infra._mode,
        'tally': [tally_type, tally.seen],
    }
    print('RESULT ' + json.dumps(out, default=repr))


if __name__ == '__main__':
    main()
