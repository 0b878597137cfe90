# pymachine's supervisor for one local machine, run by the driver in a private mount namespace of its own
# (made in the driver's child before it execs this), so the overlay mounted here disappears with the process,
# whatever happens to it. It is started inside the machine's delegated cgroups, mounts the copy-on-write root
# (for a user-namespaced machine, $PM_LOWER is the base seen through an idmapped mount the driver made in this
# namespace), and runs systemd-nspawn, booting again when the machine reboots itself (nspawn exits 133 for that).
set -u
mount -t overlay overlay -o "lowerdir=$PM_LOWER,upperdir=$PM_UPPER,workdir=$PM_WORK" "$PM_ROOT" || exit 1
stopping=0
trap 'stopping=1; kill -TERM "$child" 2>/dev/null' TERM INT
while :; do
    systemd-nspawn "$@" &
    child=$!
    while :; do
        wait "$child"
        rc=$?
        kill -0 "$child" 2>/dev/null || break
    done
    [ "$stopping" = 0 ] && [ "$rc" = 133 ] || exit "$rc"
done
