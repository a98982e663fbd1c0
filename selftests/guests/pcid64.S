/* SPDX-License-Identifier: GPL-2.0 */
/*
 * PCIDs: the guest turns CR4.PCIDE on, runs two address spaces (PCID 1 and 2) that map
 * one linear address to different pages, switches between them with and without
 * flushing (CR3 bit 63), remaps a page and invalidates it (INVPCID where CPUID has it,
 * else INVLPG), flushes by a CR3 load and by INVPCID of all contexts, and turns PCIDE
 * off. Every read whose value the architecture fixes is checked; ok lines only.
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set A, 0x400000		/* address space A: PML4, PDPT, PD, PT */
	.set B, 0x410000		/* address space B */
	.set PA, 0x600000
	.set PB, 0x601000
	.set PC, 0x602000
	.set VA, 0x8000000000
	.set NOFLUSH, 0x8000000000000000
_start:
	mov	byte ptr [PA], 0xa1
	mov	byte ptr [PB], 0xb2
	mov	byte ptr [PC], 0xc3
	mov	rdi, A
	mov	rsi, PA
	call	space
	mov	rdi, B
	mov	rsi, PB
	call	space
	mov	eax, 1
	cpuid
	bt	ecx, 17
	jnc	no_pcid
	mov	eax, 7
	xor	ecx, ecx
	cpuid
	shr	ebx, 10
	and	ebx, 1
	mov	r15, rbx		/* r15: INVPCID available */
	/* CPUID values differ between CPU models: none in the final state. */
	xor	ebx, ebx
	xor	ecx, ecx
	xor	edx, edx
	/* PCIDE needs CR3[11:0] = 0. */
	mov	rax, A
	mov	cr3, rax
	mov	rax, cr4
	or	rax, 1 << 17
	mov	cr4, rax
	lea	rsi, [rip + s_on]
	call	puts

	mov	rax, A + 1
	mov	cr3, rax
	movabs	rdi, VA
	cmp	byte ptr [rdi], 0xa1
	jne	fail
	mov	rax, B + 2
	mov	cr3, rax
	cmp	byte ptr [rdi], 0xb2
	jne	fail
	movabs	rax, A + 1 + NOFLUSH
	mov	cr3, rax
	cmp	byte ptr [rdi], 0xa1
	jne	fail
	mov	rax, cr3		/* bit 63 is not part of CR3 */
	cmp	rax, A + 1
	jne	fail
	lea	rsi, [rip + s_switch]
	call	puts

	/* Remap VA in A (current) to PC, invalidate that page of PCID 1. */
	mov	qword ptr [A + 0x3000], PC + 3
	call	inval_va
	cmp	byte ptr [rdi], 0xc3
	jne	fail
	lea	rsi, [rip + s_inval]
	call	puts

	/* Remap A back to PA while B runs; a flushing load of A must see it. */
	movabs	rax, B + 2 + NOFLUSH
	mov	cr3, rax
	mov	qword ptr [A + 0x3000], PA + 3
	cmp	byte ptr [rdi], 0xb2
	jne	fail
	mov	rax, A + 1
	mov	cr3, rax
	cmp	byte ptr [rdi], 0xa1
	jne	fail
	lea	rsi, [rip + s_flush]
	call	puts

	/* INVPCID of all contexts, then PCIDE off. */
	mov	qword ptr [A + 0x3000], PC + 3
	test	r15, r15
	jz	1f
	mov	eax, 2
	lea	rcx, [rip + desc]
	invpcid	rax, [rcx]
	jmp	2f
1:	mov	rax, A + 1		/* no INVPCID: a flushing CR3 load does the same */
	mov	cr3, rax
2:	cmp	byte ptr [rdi], 0xc3
	jne	fail
	mov	rax, A
	mov	cr3, rax
	mov	rax, cr4
	and	rax, ~(1 << 17)
	mov	cr4, rax
	cmp	byte ptr [rdi], 0xc3
	jne	fail
	lea	rsi, [rip + s_off]
	call	puts
	xor	r15, r15		/* INVPCID or not, the same final state */
	xor	ecx, ecx
	mov	al, 0x2e
	out	0xf4, al

no_pcid:
	lea	rsi, [rip + s_nopcid]
	call	puts
	mov	al, 0x2f
	out	0xf4, al
fail:
	lea	rsi, [rip + s_fail]
	call	puts
	mov	al, 0x2d
	out	0xf4, al

/* inval_va: VA of PCID 1 with INVPCID type 0, or INVLPG. */
inval_va:
	test	r15, r15
	jz	3f
	movabs	rax, VA
	mov	[rip + desc + 8], rax
	mov	qword ptr [rip + desc], 1
	xor	eax, eax
	lea	rcx, [rip + desc]
	invpcid	rax, [rcx]
	ret
3:	invlpg	[rdi]
	ret

/* space(rdi = tables, rsi = page): VA -> page; PML4 entry 0 is rvmm-run's identity map. */
space:
	mov	rax, [0x1000]
	mov	[rdi], rax
	lea	rax, [rdi + 0x1000 + 3]
	mov	[rdi + 8], rax
	lea	rax, [rdi + 0x2000 + 3]
	mov	[rdi + 0x1000], rax
	lea	rax, [rdi + 0x3000 + 3]
	mov	[rdi + 0x2000], rax
	lea	rax, [rsi + 3]
	mov	[rdi + 0x3000], rax
	ret

puts:
	mov	dx, 0x3f8
4:	lodsb
	test	al, al
	jz	5f
	out	dx, al
	jmp	4b
5:	ret

	.data
	.balign	16
desc:	.quad	0, 0
s_on:	.asciz	"pcid64: CR4.PCIDE on\n"
s_switch: .asciz "switches with and without flush: ok\n"
s_inval: .asciz	"remapped page invalidated: ok\n"
s_flush: .asciz	"flushing CR3 load sees the other space's change: ok\n"
s_off:	.asciz	"flush of all contexts, PCIDE off: ok\n"
s_nopcid: .asciz "no PCID in CPUID\n"
s_fail:	.asciz	"FAILED\n"
