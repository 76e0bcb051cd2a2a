// Runs systemd/50-pulsebell.rules against a stub of polkit's JavaScript API
// and checks what it allows. Used by scripts/check-units (node).
"use strict";
const fs = require("fs");
const path = process.argv[2];
const rules = [];
const polkit = {
    Result: { YES: "yes", NO: "no", AUTH_ADMIN: "auth_admin", NOT_HANDLED: null },
    addRule: (f) => rules.push(f),
    log: () => {},
};
new Function("polkit", fs.readFileSync(path, "utf8"))(polkit);
if (rules.length !== 1) throw new Error(`expected one rule, found ${rules.length}`);

function decide(user, id, details = {}) {
    const action = { id, lookup: (k) => details[k] };
    const subject = { user, isInGroup: () => false, local: false, active: false };
    return rules[0](action, subject);
}
const cases = [
    ["pulsebell", "org.freedesktop.login1.reboot", {}, "yes"],
    ["pulsebell", "org.freedesktop.login1.reboot-multiple-sessions", {}, "yes"],
    ["pulsebell", "org.freedesktop.login1.reboot-ignore-inhibit", {}, null],
    ["pulsebell", "org.freedesktop.login1.power-off", {}, null],
    ["pulsebell", "org.freedesktop.systemd1.manage-units", { unit: "app.service", verb: "restart" }, "yes"],
    ["pulsebell", "org.freedesktop.systemd1.manage-units", { unit: "app.service", verb: "stop" }, "yes"],
    ["pulsebell", "org.freedesktop.systemd1.manage-units", { unit: "ssh.service", verb: "stop" }, null],
    ["pulsebell", "org.freedesktop.systemd1.manage-units", { unit: "app.service", verb: "kill" }, null],
    ["pulsebell", "org.freedesktop.systemd1.manage-unit-files", {}, null],
    ["pulsebell", "org.freedesktop.systemd1.set-environment", {}, null],
    ["someone", "org.freedesktop.login1.reboot", {}, null],
    ["someone", "org.freedesktop.systemd1.manage-units", { unit: "app.service", verb: "restart" }, null],
];
let failed = 0;
for (const [user, id, details, want] of cases) {
    const got = decide(user, id, details);
    const ok = got === want;
    if (!ok) failed++;
    console.log(`${ok ? "ok  " : "FAIL"} ${user} ${id} ${JSON.stringify(details)} -> ${got === null ? "not handled" : got}`);
}
console.log(`polkit rule: ${cases.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
